"""Hierarchical memories: no-op at init, equivalence with a widened FFN, gradient isolation,
generic switch, storage round-trip, parameter accounting, LoRA-FFN and KV variants."""

import math

import numpy as np
import pytest
import torch

from index.tree import generic_block_ids, n_tree_blocks, path_block_ids
from train.memory import Fetched, MemoryBank, MemoryConfig, TensorBlockStore, all_block_ids, block_shapes, param_counts
from train.model import Anchor, ModelConfig, load_model_config

K, RANKS = 3, (6, 4, 2)
CFG = ModelConfig(vocab_size=61, d_model=16, n_layers=2, n_heads=2, ffn_hidden=24, max_seq_len=12)


def paths_of(leaves, k=K, depth=len(RANKS)):
    leaves = np.asarray(leaves)
    return np.stack([leaves // k ** (depth - 1 - i) % k for i in range(depth)], 1)


def make(kind="ffn", ranks=RANKS, owned=None, seed=0):
    torch.manual_seed(seed)
    model = Anchor(CFG).eval()
    bank = MemoryBank.create(MemoryConfig(kind=kind, ranks=ranks, k=K, seed=seed), CFG, owned)
    return model, bank


def randomise(bank, scale=0.2):
    """Give every block non-zero output-side weights (a 'trained' bank)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for named in bank.store.tensors.values():
            for t in named.values():
                t.copy_(torch.randn(t.shape, generator=g) * scale)


TOK = torch.randint(0, CFG.vocab_size, (4, 10), generator=torch.Generator().manual_seed(7))
DIFFERENT = paths_of([0, 5, 13, 26])  # four different leaves (some share level-1 blocks)
SAME = paths_of([11, 11, 11, 11])


# ---------------------------------------------------------------- no-op at init


@pytest.mark.parametrize("kind", ["ffn", "lora", "kv"])
@pytest.mark.parametrize("generic", [False, True])
def test_fresh_bank_changes_no_output(kind, generic):
    model, bank = make(kind)
    ref = model(TOK)
    for paths in (DIFFERENT, SAME):
        fetched = bank.fetch(bank.block_ids(paths, generic=generic))
        assert torch.equal(model(TOK, fetched), ref)


# ---------------------------------------------------------------- equals one widened FFN


def widened(model, bank, block_ids_row):
    """An anchor whose every FFN is widened by the units of the given blocks, built directly."""
    units = []
    for l, bid in enumerate(block_ids_row, start=1):
        if bid >= 0 and l in bank.store.shapes:
            units.append(bank.store.read(l, torch.tensor([bid])))
    R = sum(u["w_gate"].shape[2] for u in units)
    cfg = ModelConfig(**{**CFG.to_dict(), "ffn_hidden": CFG.ffn_hidden + R})
    wide = Anchor(cfg).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, p in wide.named_parameters():
            base = state[name]
            if p.shape == base.shape:
                p.copy_(base)
                continue
            layer = int(name.split(".")[1])
            if name.endswith(("w_gate.weight", "w_up.weight")):
                key = "w_gate" if "w_gate" in name else "w_up"
                p.copy_(torch.cat([base] + [u[key][0, layer] for u in units], 0))
            else:  # w_down [d, F + R]; memory rows are stored [r, d]
                p.copy_(torch.cat([base] + [u["w_down"][0, layer].T for u in units], 1))
    return wide


@pytest.mark.parametrize("paths", [DIFFERENT, SAME], ids=["different_paths", "one_leaf_fast_path"])
def test_concatenated_blocks_equal_widened_ffn(paths):
    model, bank = make()
    randomise(bank)
    ids = bank.block_ids(paths)
    fetched = bank.fetch(ids)
    assert fetched.all_same == (paths is SAME)
    out = model(TOK, fetched)
    assert not torch.allclose(out, model(TOK), atol=1e-3)  # the memory does something
    for b in range(TOK.shape[0]):
        ref = widened(model, bank, ids[b].tolist())(TOK[b : b + 1])
        torch.testing.assert_close(out[b : b + 1], ref, rtol=1e-5, atol=1e-5)


def test_disabled_level_and_mixed_batch():
    model, bank = make()
    randomise(bank)
    ids = bank.block_ids(DIFFERENT)
    ids[0, 1] = -1  # level 2 off for sequence 0
    ids[2, :] = -1  # no memory at all for sequence 2
    out = model(TOK, bank.fetch(ids))
    torch.testing.assert_close(out[0:1], widened(model, bank, ids[0].tolist())(TOK[0:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:3], model(TOK[2:3]), rtol=1e-5, atol=1e-5)
    off = bank.fetch(torch.full((4, 3), -1))
    assert all(i.numel() == 0 for i in off.ids) and torch.equal(model(TOK, off), model(TOK))


# ---------------------------------------------------------------- gradients


def test_gradients_reach_only_the_batch_blocks():
    model, bank = make()
    randomise(bank)
    ids = bank.block_ids(DIFFERENT)
    fetched = bank.fetch(ids)
    for l in range(3):  # only the batch's blocks are fetched, each once
        assert fetched.ids[l].tolist() == sorted(set(ids[:, l].tolist()))
    model.loss(torch.cat([TOK, TOK[:, :1]], 1), memory=fetched).backward()
    for named in fetched.params:
        for t in named.values():
            assert t.grad is not None and bool((t.grad.flatten(1).abs().sum(1) > 0).all())
    # an SGD step written back moves exactly the rows of the batch's blocks
    before = {l: {n: t.clone() for n, t in named.items()} for l, named in bank.store.tensors.items()}
    with torch.no_grad():
        for t in fetched.leaves():
            t -= 0.1 * t.grad
    bank.write(fetched)
    for l, named in bank.store.tensors.items():
        changed = set(bank.store.ids[l][(named["w_down"] != before[l]["w_down"]).flatten(1).any(1)].tolist())
        assert changed == set(ids[:, l - 1].tolist())


def test_per_sequence_gradients_do_not_mix():
    """A block used by one sequence gets exactly the gradient that sequence alone gives it."""
    model, bank = make()
    randomise(bank)
    ids = bank.block_ids(DIFFERENT)
    fetched = bank.fetch(ids)
    model(TOK, fetched).square().sum().backward()
    for b in range(TOK.shape[0]):
        alone = bank.fetch(ids[b : b + 1])
        assert alone.all_same
        model(TOK[b : b + 1], alone).square().sum().backward()
        row = int(fetched.index[2][b])  # level-3 blocks differ per sequence
        for n, t in fetched.params[2].items():
            torch.testing.assert_close(t.grad[row], alone.params[2][n].grad[0], rtol=1e-4, atol=1e-5)


def test_fresh_ffn_memory_learns():
    model, bank = make()
    fetched = bank.fetch(bank.block_ids(DIFFERENT))
    model.loss(TOK, memory=fetched).backward()
    assert all(p["w_down"].grad.abs().sum() > 0 for p in fetched.params)
    assert fetched.params[0]["w_gate"].grad.abs().sum() == 0  # zero output projection: no signal yet


# ---------------------------------------------------------------- generic memory


def test_generic_vs_fetched_switch():
    model, bank = make()
    randomise(bank)
    gen = torch.from_numpy(generic_block_ids(K, 3))
    assert bank.generic_ids().tolist() == gen.tolist() == [n_tree_blocks(K, 3) + i for i in range(3)]
    fetched_ids = bank.block_ids(DIFFERENT)
    assert torch.equal(fetched_ids, torch.from_numpy(path_block_ids(DIFFERENT, K)))
    all_gen = bank.block_ids(DIFFERENT, generic=True)
    assert (all_gen == gen).all()
    mixed = bank.block_ids(DIFFERENT, generic=torch.tensor([True, False, False, True]))
    assert (mixed[[0, 3]] == gen).all() and torch.equal(mixed[[1, 2]], fetched_ids[[1, 2]])
    f_gen = bank.fetch(all_gen)
    assert f_gen.all_same
    out_gen, out_fetch, out_mixed = (
        model(TOK, f_gen),
        model(TOK, bank.fetch(fetched_ids)),
        model(TOK, bank.fetch(mixed)),
    )
    assert not torch.allclose(out_gen, out_fetch, atol=1e-3)
    torch.testing.assert_close(out_mixed[[0, 3]], out_gen[[0, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_mixed[[1, 2]], out_fetch[[1, 2]], rtol=1e-5, atol=1e-5)
    draws = bank.draw_generic(17_000, torch.Generator().manual_seed(0))
    assert abs(draws.float().mean().item() - 1 / 17) < 0.01


# ---------------------------------------------------------------- storage


def test_safetensors_round_trip_exact(tmp_path):
    _, bank = make()
    randomise(bank)
    path = str(tmp_path / "bank.safetensors")
    bank.store.save(path, metadata={"memory": bank.config.to_dict()})
    back = TensorBlockStore.load(path)
    assert torch.equal(back.owned_ids(), bank.store.owned_ids())
    for l, named in bank.store.tensors.items():
        for n, t in named.items():
            assert torch.equal(back.tensors[l][n], t)
    assert "memory" in TensorBlockStore.read_metadata(path)
    # a subset (one rank's subtree + the generic blocks) loads and matches
    want = torch.tensor([1, 3, 4, 5, 12, 13, 14] + generic_block_ids(K, 3).tolist())
    part = TensorBlockStore.load(path, owned_ids=want)
    assert part.owned_ids().tolist() == sorted(want.tolist())
    for l in part.shapes:
        for n, t in part.read(l, part.ids[l]).items():
            assert torch.equal(t, bank.store.read(l, part.ids[l])[n])
    with pytest.raises(KeyError):
        TensorBlockStore.load(path, owned_ids=[10_000])


def test_partial_store_owns_any_ids_and_init_is_owner_independent():
    mcfg = MemoryConfig(ranks=RANKS, k=K)
    full = TensorBlockStore.create(mcfg, CFG)
    assert torch.equal(full.owned_ids(), all_block_ids(mcfg))
    subtree = torch.tensor([2, 3 + 6, 3 + 7, 3 + 8] + generic_block_ids(K, 3).tolist())
    part = TensorBlockStore.create(mcfg, CFG, subtree)
    assert part.owned_ids().tolist() == sorted(subtree.tolist())
    for l in part.shapes:
        for n, t in part.read(l, part.ids[l]).items():
            assert torch.equal(t, full.read(l, part.ids[l])[n])
    with pytest.raises(KeyError, match="not owned"):
        part.read(1, torch.tensor([0]))
    bank = MemoryBank(mcfg, CFG.n_layers, CFG.d_model, part)
    with pytest.raises(KeyError):
        bank.fetch(bank.block_ids(paths_of([0])))
    bank.fetch(bank.block_ids(paths_of([24]), generic=torch.tensor([True])))
    moments = part.state_store("exp_avg")
    assert torch.equal(moments.owned_ids(), part.owned_ids()) and moments.tensors[1]["w_gate"].abs().sum() == 0


def test_rank_zero_level_is_skipped():
    model, bank = make(ranks=(6, 2, 0))
    assert 3 not in bank.store.shapes
    fetched = bank.fetch(bank.block_ids(DIFFERENT))
    assert fetched.ids[2].numel() == 0 and fetched.params[2] == {}
    assert torch.equal(model(TOK, fetched), model(TOK))


def test_bf16_model_takes_fp32_bank():
    model, bank = make()
    randomise(bank)
    fetched = bank.fetch(bank.block_ids(DIFFERENT))
    out = model.to(torch.bfloat16)(TOK, fetched)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert fetched.params[0]["w_down"].grad.dtype == torch.float32


# ---------------------------------------------------------------- parameter accounting


def test_paper_160m_counts():
    pc = param_counts(load_model_config("paper160m"), MemoryConfig(kind="ffn", ranks=(256, 64, 16, 0), k=16, depth=4))
    assert pc["fetched"] == 3 * (256 + 64 + 16) * 35 * 512
    assert round(pc["fetched"] / 1e6, 2) == 18.06
    assert round(pc["bank"] / 1e9, 2) == 4.62
    assert [x["nodes"] for x in pc["per_level"]] == [16, 256, 4096, 65536]


@pytest.mark.parametrize("kind", ["ffn", "lora", "kv"])
def test_counts_match_store(kind):
    mcfg = MemoryConfig(kind=kind, ranks=RANKS, k=K)
    pc = param_counts(CFG, mcfg)
    shapes = block_shapes(mcfg, CFG)
    for x in pc["per_level"]:
        assert x["block"] == sum(math.prod(s) for s in shapes[x["level"]].values())
    store = TensorBlockStore.create(mcfg, CFG)
    assert sum(t.numel() for named in store.tensors.values() for t in named.values()) == pc["bank"] + pc["generic"]
    assert store.nbytes() == 4 * (pc["bank"] + pc["generic"])  # float32
    d, f, a, L = CFG.d_model, CFG.ffn_hidden, CFG.attn_dim, CFG.n_layers
    assert pc["fetched"] == sum(RANKS) * L * {"ffn": 3 * d, "lora": 3 * (d + f), "kv": 2 * a}[kind]


# ---------------------------------------------------------------- LoRA-FFN and KV memories


@pytest.mark.parametrize("kind", ["lora", "kv"])
def test_other_kinds_fresh_noop_and_gradients_flow(kind):
    model, bank = make(kind)
    ids = bank.block_ids(DIFFERENT)
    fetched = bank.fetch(ids)
    assert torch.equal(model(TOK, fetched), model(TOK))
    model.loss(TOK, memory=fetched).backward()
    out_side = {"lora": ("b_gate", "b_up", "b_down"), "kv": ("v",)}[kind]
    for named in fetched.params:
        for n in out_side:
            assert named[n].grad is not None and named[n].grad.abs().sum() > 0
    # after one step the input side learns too, and the output changes
    with torch.no_grad():
        for t in fetched.leaves():
            t -= 0.5 * t.grad
    bank.write(fetched)
    again = bank.fetch(ids)
    out = model(TOK, again)
    assert not torch.allclose(out, model(TOK))
    model.loss(TOK, memory=again).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in again.leaves())


@pytest.mark.parametrize("kind", ["lora", "kv"])
def test_other_kinds_batched_equals_per_sequence(kind):
    model, bank = make(kind)
    randomise(bank)
    ids = bank.block_ids(DIFFERENT)
    ids[1, 2] = -1
    ids[3, :] = -1
    out = model(TOK, bank.fetch(ids))
    for b in range(TOK.shape[0]):
        torch.testing.assert_close(
            out[b : b + 1], model(TOK[b : b + 1], bank.fetch(ids[b : b + 1])), rtol=1e-5, atol=1e-5
        )
    torch.testing.assert_close(out[3:4], model(TOK[3:4]), rtol=1e-5, atol=1e-5)


def test_fetched_api_shape():
    _, bank = make()
    ids = bank.block_ids(DIFFERENT)
    f = bank.fetch(ids)
    assert isinstance(f, Fetched) and f.batch_size == 4 and not f.all_same
    for lv in f.levels:
        assert lv.params["w_gate"].shape == (lv.ids.numel(), CFG.n_layers, RANKS[lv.level - 1], CFG.d_model)
        assert lv.params["w_gate"].requires_grad and lv.params["w_gate"].is_leaf
        assert torch.equal(lv.ids[lv.index], ids[:, lv.level - 1])
    with pytest.raises(ValueError, match="block_ids"):
        bank.fetch(ids[:, :2])


def test_union_of_ffn_memories_equals_their_units_together():
    """Two paths fetched together (inference, two_paths routing): chained hooks = one FFN with all units."""
    from train.memory import ChainedLayerMemory, FFNLayerMemory

    g = torch.Generator().manual_seed(0)
    d, ra, rb = 8, 3, 2
    gu_a, gu_b = torch.randn(2 * ra, d, generator=g), torch.randn(2 * rb, d, generator=g)
    down_a, down_b = torch.randn(ra, d, generator=g), torch.randn(rb, d, generator=g)
    x, out = torch.randn(2, 5, d, generator=g), torch.randn(2, 5, d, generator=g)
    chained = ChainedLayerMemory([FFNLayerMemory(gu_a, down_a), FFNLayerMemory(gu_b, down_b)]).post_ffn(x, None, out)
    # one memory with both unit sets: gate rows then up rows, each the two paths' units in turn
    (ga, ua), (gb, ub) = gu_a.chunk(2), gu_b.chunk(2)
    both = FFNLayerMemory(torch.cat([ga, gb, ua, ub]), torch.cat([down_a, down_b])).post_ffn(x, None, out)
    assert torch.allclose(chained, both, atol=1e-5)


@pytest.mark.parametrize("kind", ["ffn", "kv", None])
def test_cached_decode_equals_forward_on_each_unpadded_sequence(kind):
    """Anchor.decode (key/value cache, right-padded prompts of different lengths, per-sequence positions)
    gives the logits forward gives each sequence alone, prompt and every generated token."""
    from train.model import DecodeCache

    model, bank = make(kind or "ffn")
    randomise(bank)
    ids = None if kind is None else bank.block_ids(DIFFERENT)
    memory = None if ids is None else bank.fetch(ids, requires_grad=False)
    lengths = torch.tensor([3, 6, 1, 4])
    prompts = torch.where(torch.arange(6)[None, :] < lengths[:, None], TOK[:, :6], 0)  # padding after each
    cache = DecodeCache(lengths)
    steps = [model.decode(prompts, cache, memory)]
    new = torch.randint(0, CFG.vocab_size, (4, 5), generator=torch.Generator().manual_seed(1))
    for t in range(new.shape[1]):
        steps.append(model.decode(new[:, t : t + 1], cache, memory))
    with torch.no_grad():
        for i in range(4):
            seq = torch.cat([prompts[i, : lengths[i]], new[i]])[None]
            alone = None if ids is None else bank.fetch(ids[i : i + 1], requires_grad=False)
            full = model(seq, alone)[0, int(lengths[i]) - 1 :]
            assert torch.allclose(torch.stack([s[i] for s in steps]), full, atol=1e-5), i
    with pytest.raises(ValueError, match="max_seq_len"):
        for _ in range(CFG.max_seq_len):
            model.decode(new[:, :1], cache, memory)
