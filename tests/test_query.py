"""python -m hmem.query on the BBC fixture run: text, JSON, file/stdin input, clear errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from hmem.query import main
from index.router import Router
from test_router import make_bbc_run

QUERIES = ["Shares in the bank fell after profits missed forecasts", "The film won best picture at the awards"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_bbc_run(str(tmp_path_factory.mktemp("bbc_run")))


def test_json_answers_match_router(run_dir, capsys):
    assert main(["--run", run_dir, "--json", "-n", "3", *QUERIES]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    r = Router.load(run_dir)
    paths = r.route_texts(QUERIES)
    assert [a["path"] for a in answers] == paths.tolist()
    assert [a["blocks"] for a in answers] == r.blocks(paths).tolist()
    levels = r.manifest["levels"]
    for a in answers:
        assert [lv["documents"] for lv in a["levels"]] == [
            levels[l]["node_documents"][lv["local"]] for l, lv in enumerate(a["levels"])
        ]
        assert len(a["neighbours"]) == 3 and all({"doc_id", "score"} <= set(nb) for nb in a["neighbours"])
        assert all(nb["leaf"] == a["leaf"] for nb in a["leaf_neighbours"])
        weights = [nb["weight"] for nb in a["neighbours"]]  # listed by vote weight
        assert weights == sorted(weights, reverse=True) and 0 < a["vote_share"] <= 1 + 1e-9
        assert all(0 <= nb["words"] <= 1 for nb in a["neighbours"])
        assert (a["routing"], a["vote"]) == ("neighbours", "rerank")
    assert [a["descent_path"] for a in answers] == r.route_texts(QUERIES, "descent").tolist()


def test_routing_mode_option(run_dir, capsys):
    assert main(["--run", run_dir, "--json", "--routing", "descent", *QUERIES]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["path"] for a in answers] == [a["descent_path"] for a in answers]
    assert main(["--run", run_dir, "--json", "--routing", "two_paths", *QUERIES]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(len(a["second_path"]) == len(a["path"]) for a in answers)


def test_text_output_and_file_and_stdin(run_dir, tmp_path, capsys, monkeypatch):
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(QUERIES) + "\n\n")
    assert main(["--run", run_dir, "--file", str(qfile)]) == 0
    out = capsys.readouterr().out
    assert out.count("path: [") == 2 and "training documents in leaf" in out and "of the vote's weight" in out
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUERIES[0] + "\n"))
    assert main(["--run", run_dir, "--json", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.parametrize("problem", ["empty query", "missing run", "corrupt manifest", "no index", "no query"])
def test_bad_input_exits_nonzero(problem, run_dir, tmp_path, capsys):
    run, texts = run_dir, ["some text"]
    if problem == "empty query":
        texts = [""]
    elif problem == "missing run":
        run = str(tmp_path / "missing")
    elif problem == "no query":
        texts = []
    else:
        run = str(tmp_path / "run")
        shutil.copytree(run_dir, run)
        if problem == "corrupt manifest":
            (tmp_path / "run" / "manifest.json").write_text("{ not json")
        else:
            shutil.rmtree(os.path.join(run, "index"))
    assert main(["--run", run, *texts]) == 1
    err = capsys.readouterr().err
    expected = {
        "empty query": "empty",
        "missing run": "does not exist",
        "corrupt manifest": "corrupt",
        "no index": "build_index.py",
        "no query": "no query",
    }[problem]
    assert err.startswith("error:") and expected in err


def test_process_exit_code(run_dir):
    p = subprocess.run([sys.executable, "-m", "hmem.query", "--run", run_dir, ""], capture_output=True, text=True)
    assert p.returncode == 1 and "empty" in p.stderr
