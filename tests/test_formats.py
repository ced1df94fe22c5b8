"""Every format between stages has one owner that checks its version: an unknown one is a one-line error naming
the file, the version it found and the one this code reads (docs/FORMATS.md)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fixtures import make_run_dir
from index import docindex, rundir, tree as tree_format
from index.docindex import DocumentIndex
from index.tree import Tree
from train import checkpoint, export, memory


def set_format(path: str, fmt: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    with open(path, "w") as f:
        json.dump({**doc, "format": fmt}, f)


def one_line_refusal(excinfo, path: str, found: str, reads: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg and path in msg and repr(found) in msg and reads in msg, msg


@pytest.fixture
def run(tmp_path):
    return make_run_dir(str(tmp_path / "run"))


def test_run_directory(run):
    assert rundir.read_manifest(run)["format"] == rundir.FORMAT  # the writer stamps it
    path = os.path.join(run, rundir.MANIFEST)
    set_format(path, "hmem-run/99")
    with pytest.raises(ValueError) as e:
        rundir.read_manifest(run)
    one_line_refusal(e, path, "hmem-run/99", rundir.FORMAT)


def test_a_manifest_key_of_the_wrong_type_is_named(run):
    path = os.path.join(run, rundir.MANIFEST)
    with open(path) as f:
        m = json.load(f)
    with open(path, "w") as f:
        json.dump({**m, "k": "8"}, f)
    with pytest.raises(ValueError, match="k is '8', expected int"):
        rundir.read_manifest(run)


def test_tree(run):
    path = os.path.join(run, "tree", "tree.json")
    Tree.load(os.path.join(run, "tree"))
    set_format(path, "hmem-tree/99")
    with pytest.raises(ValueError) as e:
        Tree.load(os.path.join(run, "tree"))
    one_line_refusal(e, path, "hmem-tree/99", tree_format.FORMAT)


def test_document_index(run):
    tree = Tree.load(os.path.join(run, "tree"))
    os.makedirs(os.path.join(run, "index"))
    with open(os.path.join(run, "index", "index.json"), "w") as f:
        json.dump({"format": "hmem-index/99", "tree_version": tree.version}, f)
    with pytest.raises(ValueError) as e:
        DocumentIndex.load(run, tree, tree.version)
    one_line_refusal(e, "index.json", "hmem-index/99", docindex.FORMAT)


def test_export(tmp_path):
    path = str(tmp_path / "meta.json")
    with open(path, "w") as f:
        json.dump({"format": "hmem-model/99"}, f)
    with pytest.raises(ValueError) as e:
        export.load_model(str(tmp_path))
    one_line_refusal(e, path, "hmem-model/99", export.FORMAT)


def test_bank(tmp_path):
    path = str(tmp_path / "rank0.safetensors")
    save_file(
        {"level1.ids": torch.zeros(1, dtype=torch.long)}, path, metadata={"format": "hmem-bank/99", "shapes": "{}"}
    )
    with pytest.raises(ValueError) as e:
        memory.TensorBlockStore.load(path)
    one_line_refusal(e, path, "hmem-bank/99", memory.BANK_FORMAT)


def test_checkpoint_state(tmp_path):
    d = str(tmp_path)
    checkpoint.write_state(d, {"step": 3, "loader": {"epoch": 1}, "rng": torch.arange(3)})
    assert checkpoint.read_state(d)["step"] == 3
    set_format(os.path.join(d, "state.json"), "hmem-state/99")
    with pytest.raises(ValueError) as e:
        checkpoint.read_state(d)
    one_line_refusal(e, os.path.join(d, "state.json"), "hmem-state/99", checkpoint.STATE_FORMAT)
