"""The job's command line: --help documents every option, and a bad config is one line naming the field."""

import dataclasses

import pytest

from pipeline.config import JobConfig, parse_args


def test_help_lists_every_option_with_meaning_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "fit a balanced hierarchical k-means tree" in text  # the description says what the job does
    for f in dataclasses.fields(JobConfig):
        assert "--" + f.name.replace("_", "-") in text
        assert " ".join(f.metadata["help"].split()) in text
    assert "children per node (default: 8)" in text and "(default: 'auto')" in text


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("k: abc\n", "k: 'abc' is not int"),
        ("balance_factor: [1]\n", "balance_factor: [1] is not float"),
        ("input: 3\n", "input: 3 is not a list of strings"),
        ("kk: 3\n", "unknown keys ['kk']"),
        ("k: [\n", "--config"),
        ("k: 1\n", "invalid job config: k=1: need at least 2 children per node"),
        ("max_windows: 0\n", "max_windows=0: must be >= 1"),
        ("input: [a.jsonl]\npasses: [1, 2]\n", "passes=[1, 2]: give one number per --input (1 given)"),
        ("passes: [2]\n", "passes=[2]: give one number per --input (0 given, none: the BBC demo corpus)"),
        ("input: [a.jsonl]\npasses: [0]\n", "passes=[0]: each must be >= 1"),
        ("input: [a.jsonl]\npasses: [two]\n", "passes[0]: 'two' is not int"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(tmp_path, yaml_text, message):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(path)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_command_line_overrides_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("k: 4\ninput: one.jsonl\nbalance_factor: 2\n")
    cfg = parse_args(["--config", str(path), "--depth", "2", "--id-column", ""])
    assert (cfg.k, cfg.depth, cfg.input, cfg.balance_factor, cfg.id_column) == (4, 2, ["one.jsonl"], 2.0, "")


def test_passes_take_one_number_per_input_on_the_command_line():
    cfg = parse_args(["--input", "news.jsonl", "facts/*.jsonl", "--passes", "1", "16"])
    assert cfg.passes == [1, 16] and cfg.input == ["news.jsonl", "facts/*.jsonl"]
