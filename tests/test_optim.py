import math

import pytest
import torch

from train.memory import MemoryConfig, TensorBlockStore
from train.model import ModelConfig
from train.optim import BlockGrads, TouchedAdamW, lr_at

K, DEPTH = 2, 2
MODEL = ModelConfig(vocab_size=16, d_model=8, n_layers=2, n_heads=2, ffn_hidden=16, max_seq_len=8)
MEM = MemoryConfig(kind="ffn", ranks=(3, 2), k=K, depth=DEPTH)


def make_store(ids=None) -> TensorBlockStore:
    store = TensorBlockStore.create(MEM, MODEL, ids)
    for level, named in store.shapes.items():  # non-zero everywhere, so weight decay alone moves a block
        owned = store.ids[level]
        store.write(level, owned, {n: torch.randn(len(owned), *s) for n, s in named.items()})
    return store


def grads_for(store, level, ids, seed):
    g = torch.Generator().manual_seed(seed)
    return BlockGrads(
        level, torch.tensor(ids), {n: torch.randn(len(ids), *s, generator=g) for n, s in store.shapes[level].items()}
    )


def test_always_touched_block_matches_torch_adamw():
    store = make_store()
    opt = TouchedAdamW(store, K, DEPTH, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = {n: torch.nn.Parameter(t[0].clone()) for n, t in store.read(2, torch.tensor([3])).items()}
    ref_opt = torch.optim.AdamW(ref.values(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(5):
        u = grads_for(store, 2, [3], seed=step)
        for n, p in ref.items():
            p.grad = u.grads[n][0].clone()
        ref_opt.step()
        opt.step([u], lr=1e-2)
    got = store.read(2, torch.tensor([3]))
    for n, p in ref.items():
        torch.testing.assert_close(got[n][0], p.detach(), rtol=1e-5, atol=1e-7)


def test_untouched_blocks_and_their_state_do_not_move():
    store = make_store()
    opt = TouchedAdamW(store, K, DEPTH, weight_decay=0.1)
    before = {l: store.read(l, store.ids[l]) for l in store.shapes}
    opt.step([grads_for(store, 1, [0], seed=0), grads_for(store, 2, [2, 5], seed=1)], lr=1e-2)
    touched = {1: {0}, 2: {2, 5}}
    for l in store.shapes:
        after = store.read(l, store.ids[l])
        for row, b in enumerate(store.ids[l].tolist()):
            same = all(torch.equal(before[l][n][row], after[n][row]) for n in after)
            assert same == (b not in touched[l]), f"block {b}"
            state_zero = all(not t.any() for t in opt.exp_avg.read(l, torch.tensor([b])).values())
            assert state_zero == (b not in touched[l])
    for l in store.shapes:
        assert {b for b, t in zip(opt.ids[l].tolist(), opt.steps[l].tolist()) if t} == touched[l]


def test_bias_correction_counts_the_blocks_own_steps():
    """A block touched for the first time at global step 3 takes a first-step AdamW update (|dp| ~ lr)."""
    store = make_store()
    opt = TouchedAdamW(store, K, DEPTH, weight_decay=0.0)
    for s in range(2):
        opt.step([grads_for(store, 1, [0], seed=s)], lr=1e-2)
    before = store.read(1, torch.tensor([1]))
    opt.step([grads_for(store, 1, [1], seed=9)], lr=1e-2)
    after = store.read(1, torch.tensor([1]))
    for n in before:  # first Adam step: m_hat/sqrt(v_hat) = sign(g), so every entry moves by lr
        torch.testing.assert_close((after[n] - before[n]).abs(), torch.full_like(before[n], 1e-2), rtol=1e-3, atol=1e-6)
    assert int(opt.steps[1][opt.rows(1, torch.tensor([1]))]) == 1


def test_rejects_blocks_the_rank_does_not_hold():
    store = make_store(ids=[0, 2, 3])
    opt = TouchedAdamW(store, K, DEPTH)
    with pytest.raises(KeyError, match="not held by this rank"):
        opt.step([grads_for(store, 1, [1], seed=0)], lr=1e-2)


def test_save_load_continues_identically(tmp_path):
    a, b = make_store(), make_store()
    b_init = {l: a.read(l, a.ids[l]) for l in a.shapes}
    for l in b.shapes:
        b.write(l, b.ids[l], b_init[l])
    opt_a = TouchedAdamW(a, K, DEPTH, weight_decay=0.1)
    for s in range(3):
        opt_a.step([grads_for(a, 2, [2, 3], seed=s)], lr=1e-2)
    opt_a.save(str(tmp_path / "opt.safetensors"))
    for l in b.shapes:
        b.write(l, b.ids[l], a.read(l, a.ids[l]))
    opt_b = TouchedAdamW(b, K, DEPTH, weight_decay=0.1)
    with pytest.raises(TypeError, match="list of files"):  # one path as a str would be read as its characters
        opt_b.load(str(tmp_path / "opt.safetensors"))
    opt_b.load([str(tmp_path / "opt.safetensors")])
    for opt in (opt_a, opt_b):
        opt.step([grads_for(a, 2, [3, 4], seed=7)], lr=1e-2)
    for l in a.shapes:
        for n, t in a.read(l, a.ids[l]).items():
            assert torch.equal(t, b.read(l, b.ids[l])[n])


def test_lr_schedule():
    assert lr_at(5, 1.0, 100, warmup_steps=10) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    mid = lr_at(55, 1.0, 100, warmup_steps=10, min_lr_ratio=0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(70, 2.0, 100, decay="constant") == 2.0
    with pytest.raises(ValueError):
        lr_at(1, 1.0, 10, decay="linear")
