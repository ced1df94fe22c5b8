"""python -m hmem.ask on the tiny trained model: answers, p(answer) against the model's own logits, batching,
the verdict on a bank whose leaf block was made to carry the answer, and clear errors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import PROMPTS
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hmem.ask import Asker, own_answer, main
from index.tree import path_block_ids


@pytest.fixture(scope="module")
def asker(tiny_export):
    run, export, _ = tiny_export
    return Asker(run, export, mode="descent", batch_size=2)  # the fixture run has no document index


def direct_logprob(ev, prompt: str, answer: str | list[int], ids: torch.Tensor | None) -> float:
    """log p(answer | <eot> prompt) from one forward pass of the anchor, written out here (an answer's text, or
    tokens as generated)."""
    p = [ev.eot] + ev.tokenizer.encode(prompt).ids
    a = answer if isinstance(answer, list) else ev.tokenizer.encode(" " + answer).ids
    x = torch.tensor([p + a])
    with torch.no_grad():
        logits = ev.anchor(x[:, :-1], None if ids is None else ev.bank.fetch(ids, requires_grad=False))
    logp = F.log_softmax(logits.double(), -1)[0, len(p) - 1 :, :]
    return float(logp[torch.arange(len(a)), torch.tensor(a)].sum())


def test_answers_and_probabilities_are_the_models(asker):
    ev = asker.ev
    questions = list(PROMPTS.values())
    out = asker.ask(questions, ["one", "of"], max_new=4)
    paths = ev.router.route_texts(questions)
    for q, a in enumerate(out):
        assert a["path"] == paths[q].tolist() and a["blocks"] == path_block_ids(paths[q : q + 1], 2)[0].tolist()
        names = [r["setting"] for r in a["settings"]]
        assert names == ["fetched", "generic", "none", "off@1", "off@2"]
        for r in a["settings"]:
            ids = ev.block_ids(paths[q : q + 1], r["setting"])
            assert r["logprob"] == pytest.approx(direct_logprob(ev, questions[q], a["answer"], ids), abs=1e-4)
            assert r["completion"] == ev.complete([questions[q]], ids, [4])[0]
    alone = [asker.ask([q], [ans], max_new=4)[0] for q, ans in zip(questions, ["one", "of"])]
    for batched, single in zip(out, alone):  # right padding in a batch changes nothing
        assert [r["completion"] for r in batched["settings"]] == [r["completion"] for r in single["settings"]]
        assert np.allclose(
            [r["logprob"] for r in batched["settings"]], [r["logprob"] for r in single["settings"]], atol=1e-5
        )
    fast = asker.ask(questions, max_new=4, compare=False)
    assert [a["settings"][0]["completion"] for a in fast] == [a["settings"][0]["completion"] for a in out]
    assert all(len(a["settings"]) == 1 and a["verdict"] is None for a in fast)


def test_verdict_names_the_block_that_holds_the_answer(tiny_export, tmp_path):
    """Overwrite the leaf block of one question's path with large values: the model's own answer then comes
    from that block, and the verdict (on the model's own completion) must name it, with p falling."""
    run, export, routes = tiny_export
    crafted = str(tmp_path / "export")
    shutil.copytree(export, crafted)
    question = PROMPTS["hydrogen"]
    leaf_block = int(path_block_ids(np.array([routes["hydrogen"]]), 2)[0, -1])
    g = torch.Generator().manual_seed(0)
    for name in json.load(open(os.path.join(crafted, "meta.json")))["bank_files"]:
        path = os.path.join(crafted, name)
        t = load_file(path)
        rows = (t["level2.ids"] == leaf_block).nonzero().flatten()
        for w in ("w_gate", "w_up", "w_down"):
            t[f"level2.{w}"][rows] = torch.randn(t[f"level2.{w}"][rows].shape, generator=g)
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        save_file(t, path, metadata=meta)
    asker = Asker(run, crafted, mode="descent")
    a = asker.ask([question], max_new=4)[0]
    v = a["verdict"]
    assert not a["answer_given"] and a["answer"]
    # the own answer is scored as generated: its greedy tokens (a completion need not start with a space)
    fetched = asker.ev.block_ids(np.array([a["path"]]), "fetched")
    own = own_answer(asker.ev, asker.ev.generate([question], fetched, [4])[0])
    assert asker.ev.tokenizer.decode(own).strip() == a["answer"]
    assert a["settings"][0]["logprob"] == pytest.approx(direct_logprob(asker.ev, question, own, fetched), abs=1e-4)
    assert v is not None and v["level"] == 2 and v["block"] == leaf_block and v["leaf"]
    assert v["p_without"] < v["p_fetched"] and v["logprob_drop"] > 1.0
    off1 = next(r for r in a["settings"] if r["setting"] == "off@1")
    assert a["settings"][0]["logprob"] - off1["logprob"] < v["logprob_drop"]


def test_cli_text_json_and_file(tiny_export, tmp_path, capsys):
    run, export, _ = tiny_export
    assert main(["--run", run, "--model", export, "--routing", "descent", "--answer", "one", PROMPTS["hydrogen"]]) == 0
    text = capsys.readouterr().out
    assert "route: descent" in text and "without level 2 block" in text and "p(answer)" in text
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": PROMPTS["hydrogen"], "answer": "one"}) + "\n\n" + PROMPTS["tree"] + "\n")
    assert main(["--run", run, "--model", export, "--routing", "descent", "--file", str(f), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["answer_given"] for r in rows] == [True, False] and rows[0]["answer"] == "one"


@pytest.mark.parametrize("problem", ["max_new", "empty_file", "bad_json", "no_field", "not_export"])
def test_bad_input_is_one_line(problem, tiny_export, tmp_path, capsys):
    run, export, _ = tiny_export
    f = tmp_path / "q.jsonl"
    args = ["--run", run, "--model", export, "--routing", "descent"]
    if problem == "max_new":
        args += ["--max-new", "0", "q"]
    elif problem == "not_export":
        args = ["--run", run, "--model", str(tmp_path), "q"]
    else:
        f.write_text({"empty_file": "\n", "bad_json": '{"question": \n', "no_field": '{"answer": "x"}\n'}[problem])
        args += ["--file", str(f)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {
        "max_new": "--max-new",
        "empty_file": "no question",
        "bad_json": "q.jsonl:1",
        "no_field": "q.jsonl:1",
        "not_export": "meta.json",
    }[problem] in err
