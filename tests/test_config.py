"""index/config.py, the one config loader: YAML file, --set overrides, strict keys, coercion, one error type."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from index.config import ConfigError, ConfigNotFound, apply_overrides, build, find_yaml, read_yaml


@dataclass
class Inner:
    lr: float
    steps: int = 1


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(lr=1.0))
    betas: tuple[float, float] = (0.9, 0.95)
    ranks: tuple[int, ...] = (4, 2)
    paths: list[str] = field(default_factory=list)
    name: str | None = None
    flag: bool = False

    def __post_init__(self):
        if self.inner.steps < 1:
            raise ValueError("inner.steps must be >= 1")


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_coercions():
    cfg = build(
        Outer,
        {
            "inner": {"lr": "1e-4", "steps": "3"},
            "betas": [1, "0.5"],
            "ranks": [3, 2, 1],
            "paths": "one.jsonl",
            "name": None,
            "flag": True,
        },
        "f.yaml",
    )
    assert cfg.inner == Inner(lr=1e-4, steps=3) and isinstance(cfg.inner.lr, float)
    assert cfg.betas == (1.0, 0.5) and cfg.ranks == (3, 2, 1) and cfg.paths == ["one.jsonl"]
    assert (cfg.name, cfg.flag) == (None, True)
    for raw, message in [
        ({"inner": {"lr": 1, "steps": True}}, "f.yaml: inner.steps: True is not int"),
        ({"inner": {"lr": "fast"}}, "inner.lr: 'fast' is not float"),
        ({"inner": {"lr": 1, "steps": 2.5}}, "inner.steps: 2.5 is not int"),
        ({"ranks": [1, "x"]}, "ranks[1]: 'x' is not int"),
        ({"betas": [1]}, "betas: [1] is not a list [float, float]"),
        ({"paths": 3}, "paths: 3 is not a list of strings"),
        ({"name": 3}, "name: 3 is not str"),
        ({"flag": 1}, "flag: 1 is not bool"),
        ({"inner": 3}, "f.yaml: inner: expected a mapping of Inner keys"),
    ]:
        assert message in one_line_error(build, Outer, raw, "f.yaml")


def test_strict_keys_missing_keys_and_the_dataclass_checks():
    message = one_line_error(build, Outer, {"inner": {"lr": 1, "stepz": 2}}, "f.yaml")
    assert message == "f.yaml: inner: unknown keys ['stepz']; known: ['lr', 'steps']"
    assert "unknown model config keys ['x']" in one_line_error(
        build, Inner, {"lr": 1, "x": 0}, "m.yaml", what="model config"
    )
    for empty in ({}, None):  # an empty section is {}
        assert one_line_error(build, Outer, {"inner": empty}, "f.yaml") == "f.yaml: inner: missing keys ['lr']"
    assert (
        one_line_error(build, Outer, {"inner": {"lr": 1, "steps": 0}}, "f.yaml") == "f.yaml: inner.steps must be >= 1"
    )
    assert build(Inner, {}, "f.yaml", fixed={"lr": 2.0}).lr == 2.0  # ready-made fields


def test_set_overrides_nest_and_parse_yaml():
    raw = apply_overrides(
        {"inner": {"lr": 1}, "empty": None},
        ["inner.steps=3", "betas=[0.8, 0.9]", "a.b.c=x", "empty.k=1e-4", "flag=false", "name="],
    )
    assert raw == {
        "inner": {"lr": 1, "steps": 3},
        "betas": [0.8, 0.9],
        "a": {"b": {"c": "x"}},
        "empty": {"k": "1e-4"},
        "flag": False,
        "name": None,
    }
    assert build(Outer, apply_overrides({}, ["inner.lr=1e-4", "ranks=[2]"]), "--set").inner.lr == 1e-4
    for bad, message in [
        ("inner", "expected key=value"),
        ("inner.=3", "expected key=value"),
        ("inner.lr.x=3", "inner.lr is 1, not a section"),
        ("k=[", "not valid YAML"),
    ]:
        assert message in one_line_error(apply_overrides, {"inner": {"lr": 1}}, [bad])


@pytest.mark.parametrize(
    "text, message",
    [("k: [\n", "invalid YAML at line 2, column 1"), ("- 1\n- 2\n", "expected a mapping of keys, got a list")],
)
def test_bad_yaml_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert one_line_error(read_yaml, str(path)).startswith(f"{path}: {message}")
    assert one_line_error(read_yaml, str(path), "--config c.yaml").startswith("--config c.yaml: ")
    assert "cannot read it" in one_line_error(read_yaml, str(tmp_path / "missing.yaml"))
    path.write_text("")
    assert read_yaml(str(path)) == {}


def test_find_yaml_names_the_choices(tmp_path):
    (tmp_path / "small.yaml").write_text("lr: 1\n")
    assert find_yaml("small", str(tmp_path), "model config") == str(tmp_path / "small.yaml")
    with pytest.raises(ConfigNotFound, match=r"no model config 'big': not a file and not one of \['small'\]"):
        find_yaml("big", str(tmp_path), "model config")
    assert issubclass(ConfigNotFound, FileNotFoundError)  # callers that catch the missing file still do


def test_the_three_users_raise_the_one_error(tmp_path):
    from pipeline.config import JobConfig, parse_args
    from train.config import load_config
    from train.model import load_model_config

    manifest = {"vocab_size": 300, "seq_len": 16, "k": 2, "depth": 2}  # what load_config reads of a run
    message = one_line_error(load_config, "tiny", ["optim.anchor.lrr=1"], manifest)
    assert "tiny.yaml: optim.anchor: unknown keys ['lrr']" in message
    assert "tiny.yaml: recipe: recipe.name 'x'" in one_line_error(load_config, "tiny", ["recipe.name=x"], manifest)
    assert "one rank per level" in one_line_error(load_config, "tiny", ["memory.ranks=[1,2,3]"], manifest)
    assert "memory_from_level 3: the tree has levels 1..2" in one_line_error(
        load_config, "tiny", ["recipe.memory_from_level=3"], manifest
    )
    assert load_config("tiny", ["recipe.memory_from_level=2"], manifest).recipe.memory_from_level == 2
    with pytest.raises(ConfigNotFound, match="train config 'nope'"):
        load_config("nope", [], manifest)
    assert "tiny.yaml: d_model: 'wide' is not int" in one_line_error(load_model_config, "tiny", d_model="wide")

    # the job: --set and the --FIELD aliases go through the same coercion; its edge turns a ConfigError
    # into SystemExit with the loader's one line
    path = tmp_path / "job.yaml"
    path.write_text("k: 4\n")
    cfg = parse_args(["--config", str(path), "--set", "depth=2", "--seq-len", "64", "--balance-factor", "2"])
    assert (cfg.k, cfg.depth, cfg.seq_len, cfg.balance_factor) == (4, 2, 64, 2.0)
    assert parse_args(["--set", "input=a.jsonl", "--k", "3", "--set", "k=5"]).k == 5  # --set wins over --FIELD
    expected = one_line_error(build, JobConfig, {"k": 4, "kk": 1}, f"--config {path} + command line")
    for argv, message in [
        (["--config", str(path), "--set", "kk=1"], expected),
        (["--set", "k=abc"], "command line: k: 'abc' is not int"),
        (["--k", "abc"], "command line: k: 'abc' is not int"),
        (["--config", str(tmp_path / "no.yaml")], f"--config {tmp_path / 'no.yaml'}: cannot read it"),
    ]:
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
