"""Checkpoint and export files are read without running code: a pickle in their place is refused in one line."""

import json
import os
import pickle

import pytest
import torch

from train.checkpoint import STATE_FORMAT, load_bank, read_state, write_state
from train.export import anchor_weights
from train.lazy_store import LazyBlockStore
from train.memory import MemoryConfig, TensorBlockStore
from train.model import ModelConfig
from train.optim import TouchedAdamW

K, DEPTH = 2, 2
MODEL = ModelConfig(vocab_size=300, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=32)
MEM = MemoryConfig(kind="ffn", ranks=(2, 4), k=K, depth=DEPTH)


class Payload:
    """Unpickling it creates ``marker``: what an attacker's file would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path, marker, kind: str) -> None:
    """A file at ``path`` whose loading by pickle creates ``marker``: raw pickle or a torch.save archive."""
    if kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump({"step": 1, "x": Payload(marker)}, f)
    else:
        torch.save({"step": 1, "x": Payload(marker)}, path)


def refused(call, path, match: str) -> None:
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and match in msg, msg


def test_payload_runs_when_unpickled(tmp_path):
    """The planted files are live: unpickling one does create the marker, so its absence below means something."""
    plant(tmp_path / "f", tmp_path / "marker", "pickle")
    with open(tmp_path / "f", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "marker").exists()


def test_state_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(3)
    state = {
        "step": 7,
        "tokens_seen": 10**12,
        "world_size": 2,
        "loader": {"epoch": 1, "position": 5, "seed": 0, "shuffle_buffer": 4096, "runs": 1},
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": [torch.randint(0, 256, (16,), dtype=torch.uint8) for _ in range(2)],
        },
    }
    write_state(str(tmp_path), state)
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.safetensors"]
    back = read_state(str(tmp_path))
    rng, back_rng = state.pop("rng"), back.pop("rng")
    assert back == state
    assert torch.equal(back_rng["torch"], rng["torch"]) and back_rng["torch"].dtype == torch.uint8
    assert all(torch.equal(a, b) for a, b in zip(back_rng["cuda"], rng["cuda"], strict=True))
    torch.set_rng_state(back_rng["torch"])
    x = torch.rand(4)
    torch.set_rng_state(rng["torch"])
    assert torch.equal(x, torch.rand(4))
    write_state(str(tmp_path), {"rng": {"torch": torch.get_rng_state(), "cuda": None}})  # a CPU-only run
    assert read_state(str(tmp_path))["rng"]["cuda"] is None


@pytest.mark.parametrize("name", ["state.json", "state.safetensors"])
@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_pickled_state_file_is_refused_and_runs_nothing(tmp_path, name, kind):
    write_state(str(tmp_path), {"step": 1, "rng": {"torch": torch.get_rng_state(), "cuda": None}})
    plant(tmp_path / name, tmp_path / "marker", kind)
    refused(lambda: read_state(str(tmp_path)), tmp_path / name, "not a")
    assert not (tmp_path / "marker").exists()


def test_old_state_pt_is_not_unpickled(tmp_path):
    plant(tmp_path / "state.pt", tmp_path / "marker", "torch")
    refused(lambda: read_state(str(tmp_path)), tmp_path / "state.pt", "old pickle format")
    assert not (tmp_path / "marker").exists()


def test_unknown_state_version_is_refused(tmp_path):
    write_state(str(tmp_path), {"step": 1})
    with open(tmp_path / "state.json") as f:
        doc = json.load(f)
    assert doc["format"] == STATE_FORMAT
    with open(tmp_path / "state.json", "w") as f:
        json.dump({**doc, "format": "hmem-state/99"}, f)
    refused(lambda: read_state(str(tmp_path)), tmp_path / "state.json", "'hmem-state/99'")


@pytest.mark.parametrize("reader", ["load_bank", "TensorBlockStore.load", "LazyBlockStore", "TouchedAdamW.load"])
@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_pickled_bank_file_is_refused_and_runs_nothing(tmp_path, reader, kind):
    path = tmp_path / "bank.safetensors"
    plant(path, tmp_path / "marker", kind)
    store = TensorBlockStore.create(MEM, MODEL)
    call = {
        "load_bank": lambda: load_bank([str(path)], store, K, DEPTH),
        "TensorBlockStore.load": lambda: TensorBlockStore.load(str(path)),
        "LazyBlockStore": lambda: LazyBlockStore([str(path)]),
        "TouchedAdamW.load": lambda: TouchedAdamW(store, K, DEPTH).load([str(path)]),
    }[reader]
    refused(call, path, "not a safetensors file")
    assert not (tmp_path / "marker").exists()


def test_pickled_module_states_are_refused_at_export(tmp_path):
    """ZeRO stage 0: the export reads DeepSpeed's module states itself, with weights_only=True."""
    path = tmp_path / "mp_rank_00_model_states.pt"
    plant(path, tmp_path / "marker", "torch")
    cfg = {"recipe": {"name": "anchor_only"}, "model": {}}
    refused(lambda: anchor_weights(str(tmp_path), cfg), path, "refused")
    assert not (tmp_path / "marker").exists()
    torch.save({"module": {"w": torch.ones(2, dtype=torch.bfloat16)}, "ds_version": "0"}, path)
    assert anchor_weights(str(tmp_path), cfg)["w"].dtype == torch.float32
