"""transformers interop (train/hf.py): project anchors as Llama checkpoints, FFN memory on Llama / Qwen2."""

import json
import os

import numpy as np
import pytest
import torch
from fixtures import write_tokenizer
from safetensors.torch import load_file, save_file

from train.export import load_model, write_meta
from train.hf_cli import main as hf_main
from train.model import Anchor, ModelConfig


def project_export(d: str, tied: bool) -> str:
    """A project export directory (train/export.py layout) holding a randomly initialised anchor."""
    os.makedirs(d, exist_ok=True)
    vocab = write_tokenizer(os.path.join(d, "tokenizer.json"), 300)
    cfg = ModelConfig(
        vocab_size=vocab,
        d_model=48,
        n_layers=2,
        n_heads=3,
        ffn_hidden=96,
        max_seq_len=512,
        tied_embeddings=tied,
        rope_theta=500.0,
        norm_eps=1e-6,
    )
    torch.manual_seed(0)
    anchor = Anchor(cfg)
    with torch.no_grad():  # weights well away from the init scale: a harder equality test
        for p in anchor.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_file(anchor.state_dict(), os.path.join(d, "anchor.safetensors"))
    meta = {
        "tree_version": "none",
        "k": 2,
        "depth": 1,
        "seq_len": 16,
        "eot_id": 0,
        "pad_id": 1,
        "model": cfg.to_dict(),
        "memory": None,
    }
    write_meta(d, meta)
    return d


@pytest.mark.parametrize("tied", [True, False])
def test_anchor_exports_as_llama_with_equal_logits(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenizers import Tokenizer

    src = project_export(str(tmp_path / "export"), tied)
    hf_dir = str(tmp_path / "hf")
    hf_main(["export", "--model", src, "--out", hf_dir])  # hmem-hf export
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(hf_dir))
    anchor, _, _ = load_model(src)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, anchor.cfg.vocab_size, (3, 512), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = anchor(tokens), model(input_ids=tokens).logits
    assert ours.abs().max() > 1.0  # non-trivial logits
    assert (ours - theirs).abs().max().item() <= 1e-5

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert (tok.eos_token_id, tok.pad_token_id) == (0, 1) == (model.config.eos_token_id, model.config.pad_token_id)
    text = "the atomic number of hydrogen is one"
    assert tok(text)["input_ids"] == Tokenizer.from_file(os.path.join(src, "tokenizer.json")).encode(text).ids


# ---------------------------------------------------------------- memory on a transformers base


def tiny_base(d: str, arch: str, vocab: int = 320, **extra) -> str:
    """A randomly initialised tiny Llama / Qwen2 (grouped-query attention) saved with save_pretrained."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shape = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=arch == "qwen2",
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](**{**shape, **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return d


def fetch(bank, paths):
    return bank.fetch(bank.block_ids(torch.tensor(paths)))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fresh_memory_is_an_exact_noop_and_trained_memory_is_not(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from train.hf import load_base, model_config
    from train.memory import MemoryBank, MemoryConfig

    d = tiny_base(str(tmp_path / arch), arch)
    cfg = model_config(d)
    assert (cfg.d_model, cfg.n_layers, cfg.ffn_hidden, cfg.hf) == (32, 2, 64, os.path.abspath(d))
    anchor = load_base(cfg)
    plain = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    bank = MemoryBank.create(MemoryConfig(ranks=(4, 2), k=2), cfg)
    tokens = torch.randint(0, 320, (3, 20), generator=torch.Generator().manual_seed(0))
    want = plain(input_ids=tokens).logits.detach()
    for paths in ([[0, 1]] * 3, [[0, 1], [1, 0], [1, 1]]):  # shared-leaf fast path and per-sequence gather
        assert torch.equal(anchor(tokens, fetch(bank, paths)), want)
    assert torch.equal(anchor(tokens), want)

    paths = [[0, 1], [1, 0], [1, 1]]
    fetched = fetch(bank, paths)
    anchor(tokens, fetched).logsumexp(-1).sum().backward()
    grads = [t.grad for t in fetched.leaves()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None and not p.requires_grad for p in anchor.parameters())  # the base stays frozen
    assert not torch.allclose(anchor(tokens, fetch(trained_like(bank), paths)), want, atol=1e-3)


def assert_decode_matches_forward(anchor, prompts: list[list[int]], bank, paths, steps: int, atol: float) -> None:
    """Batched decoding of right-padded prompts of unequal lengths, each on its own blocks, gives every
    sequence the logits ``forward`` gives it alone, at each step of its own greedy continuation."""
    from train.model import DecodeCache

    cache = DecodeCache(torch.tensor([len(p) for p in prompts]))
    padded = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p)
    seqs = [list(p) for p in prompts]
    with torch.no_grad():
        logits = anchor.decode(padded, cache, fetch(bank, paths))
        for _ in range(steps):
            for i, seq in enumerate(seqs):
                alone = anchor(torch.tensor([seq]), fetch(bank, [paths[i]]))[0, -1]
                assert torch.allclose(logits[i], alone, atol=atol), (logits[i] - alone).abs().max()
            nxt = logits.argmax(-1)
            for seq, t in zip(seqs, nxt.tolist()):
                seq.append(t)
            logits = anchor.decode(nxt[:, None], cache)


def trained_like(bank):
    """A fresh bank with w_down away from zero, so its blocks change the logits."""
    torch.manual_seed(1)
    for level, ids in bank.store.ids.items():
        bank.store.write(level, ids, {"w_down": torch.randn_like(bank.store.read(level, ids)["w_down"])})
    return bank


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_decoding_equals_forward_per_sequence(tmp_path, arch):
    from train.hf import load_base, model_config
    from train.memory import MemoryBank, MemoryConfig

    anchor = load_base(model_config(tiny_base(str(tmp_path / arch), arch)))
    bank = trained_like(MemoryBank.create(MemoryConfig(ranks=(4, 2), k=2), anchor.cfg))
    prompts = [[5, 9, 33, 2, 7], [11] * 9, [300, 4], [7, 7, 7, 7, 8]]  # two of one length: one head position
    assert_decode_matches_forward(anchor, prompts, bank, [[0, 1], [1, 0], [1, 1], [0, 0]], steps=6, atol=1e-5)


def test_unsupported_architectures_and_changed_bases_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.hf import load_base, model_config

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="'gpt2'.*not supported.*llama"):
        model_config(str(tmp_path / "gpt2"))
    with pytest.raises(
        ValueError, match="gelu.*not supported"
    ):  # a GeGLU MLP: the units would use the wrong activation
        model_config(tiny_base(str(tmp_path / "geglu"), "llama", hidden_act="gelu"))
    with pytest.raises(ValueError, match="fixes the architecture"):
        model_config(tiny_base(str(tmp_path / "llama"), "llama"), {"d_model": 64})
    cfg = model_config(str(tmp_path / "llama"))
    tiny_base(str(tmp_path / "llama"), "llama", rms_norm_eps=1e-5)  # same shape, another checkpoint
    with pytest.raises(ValueError, match="content hash"):
        load_base(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("arch,launch", [("llama", "deepspeed"), ("qwen2", "python")])
def test_memory_only_on_a_transformers_base(tmp_path, arch, launch):
    """Train FFN memory on a frozen base with the real trainer; resume; export; evaluate; refuse a changed base."""
    from fixtures import make_run_dir
    from test_trainer import blocks_of, losses, train

    from index.router import Router
    from train.evaluate import Evaluator, block_report
    from train.hf import HFAnchor, content_hash
    from train.memory import TensorBlockStore

    run = make_run_dir(str(tmp_path / "run"), k=2, depth=2, seq_len=16, dim=384)
    base = tiny_base(str(tmp_path / "base"), arch)
    base_weights = {n: t.clone() for n, t in load_file(os.path.join(base, "model.safetensors")).items()}
    out = str(tmp_path / "out")
    sets = (
        f"model={{hf: {base}}}",
        "recipe.name=memory_only",
        "memory.ranks=[8,4]",
        "optim.memory.lr=0.05",
        "schedule.max_steps=4",
        "schedule.checkpoint_every=2",
    )
    nproc = 2 if launch == "deepspeed" else 1
    train(launch, run, out, *sets, nproc=nproc)
    first = losses(out)
    ckpt = os.path.join(out, "checkpoints")
    final = {r: blocks_of(TensorBlockStore.load(f"{ckpt}/step00000004/rank{r}/bank.safetensors")) for r in range(nproc)}

    # the base did not move: the trainer's module state equals the checkpoint file bit for bit
    module = torch.load(f"{ckpt}/step00000004/mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.equal(module[f"model.{n}"], t) for n, t in base_weights.items())
    assert content_hash(base) == json.load(open(f"{out}/export/meta.json"))["model"]["hf_sha256"]
    assert not os.path.exists(f"{out}/export/anchor.safetensors")  # referenced, not copied

    # resume from step 2: the same losses and blocks as the uninterrupted run
    with open(f"{ckpt}/latest", "w") as f:
        f.write("step00000002")
    log = train(launch, run, out, *sets, nproc=nproc)
    assert "resumed from" in log
    assert all(abs(losses(out)[s] - first[s]) <= 1e-6 for s in (3, 4))
    again = {r: blocks_of(TensorBlockStore.load(f"{ckpt}/step00000004/rank{r}/bank.safetensors")) for r in range(nproc)}
    assert all(torch.equal(again[r][i][n], final[r][i][n]) for r in final for i in final[r] for n in final[r][i])

    # export round trip: the base behind the anchor's interface, the trained bank, evaluation unchanged
    anchor, bank, meta = load_model(f"{out}/export")
    assert isinstance(anchor, HFAnchor) and meta["model"]["hf"] == os.path.abspath(base)
    merged = {i: b for r in final for i, b in final[r].items()}
    exported = blocks_of(bank.store)
    assert all(torch.equal(exported[i][n], merged[i][n]) for i in merged for n in merged[i])
    assert any(exported[i]["w_down"].abs().sum() > 0 for i in merged)  # the memory trained
    router = Router.load(run, documents=False)
    ev = Evaluator(f"{out}/export", router, batch_size=2)
    ppl = ev.perplexity([{"text": "the atomic number of hydrogen is one"}, {"text": "memory blocks on a tree"}])
    assert ppl["fetched"]["all"] != ppl["none"]["all"]
    report = block_report(f"{out}/export", router, ["memory blocks on a tree"])
    assert [lv["level"] for lv in report[0]] == [1, 2]

    tiny_base(base, arch, rms_norm_eps=1e-5)  # the base directory now holds another model
    with pytest.raises(ValueError, match="content hash"):
        load_model(f"{out}/export")


@pytest.mark.slow
@pytest.mark.slow
def test_bf16_autocast_trains_memory_and_keeps_the_frozen_base_in_fp32(tmp_path):
    """deepspeed.bf16 on a frozen base is autocast: the base stays fp32 and bit-identical, the bank fp32, and the
    losses follow the fp32 run's within bf16's rounding."""
    from fixtures import make_run_dir
    from test_trainer import blocks_of, losses, train

    from train.memory import TensorBlockStore

    run = make_run_dir(str(tmp_path / "run"), k=2, depth=2, seq_len=16, dim=384)
    base = tiny_base(str(tmp_path / "base"), "llama")
    base_weights = load_file(os.path.join(base, "model.safetensors"))
    sets = (f"model={{hf: {base}}}", "recipe.name=memory_only", "memory.ranks=[8,4]", "schedule.max_steps=3")
    train("python", run, str(tmp_path / "fp32"), *sets, nproc=1)
    log = train("python", run, str(tmp_path / "bf16"), *sets, "deepspeed.bf16=true", nproc=1)
    assert "bf16 autocast, fp32 weights" in log
    ckpt = str(tmp_path / "bf16" / "checkpoints" / "step00000003")
    module = torch.load(f"{ckpt}/mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert all(torch.equal(module[f"model.{n}"], t) for n, t in base_weights.items())
    blocks = blocks_of(TensorBlockStore.load(f"{ckpt}/rank0/bank.safetensors"))
    assert {t.dtype for b in blocks.values() for t in b.values()} == {torch.float32}
    assert any(b["w_down"].abs().sum() > 0 for b in blocks.values())  # the memory trained under autocast
    exact, fast = losses(str(tmp_path / "fp32")), losses(str(tmp_path / "bf16"))
    assert exact.keys() == fast.keys() and all(abs(fast[s] - exact[s]) < 0.05 * exact[s] for s in exact)
    assert fast != exact  # autocast did run in bf16


def test_job_packs_with_a_transformers_tokenizer(tmp_path):
    """--tokenizer DIR: the model's own ids (eos 2, no pad token -> pad = eos) end and pad the sequences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.spark_helpers import SMALL, manifest, read_table, submit, write_bbc_subset

    docs = write_bbc_subset(str(tmp_path / "bbc.jsonl"), 30)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [d["text"] for d in docs],
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        str(tmp_path / "tok")
    )
    out = tmp_path / "run"
    p = submit(
        [
            "--input",
            str(tmp_path / "bbc.jsonl"),
            "--id-column",
            "id",
            "--output",
            str(out),
            *SMALL,
            "--tokenizer",
            str(tmp_path / "tok"),
        ]
    )
    assert p.returncode == 0, p.stdout[-4000:]
    m = manifest(out)
    assert (m["eot_id"], m["pad_id"], m["vocab_size"]) == (2, 2, tok.get_vocab_size())
    shards, routed = read_table(out / "shards"), read_table(out / "routed")
    assert all((np.asarray(s.tokens[s.n_valid :]) == 2).all() for _, s in shards.iterrows())
    n_eos = sum(int((np.asarray(s.tokens[: s.n_valid]) == 2).sum()) for _, s in shards.iterrows())
    assert n_eos == len(routed) == len(docs)  # one end-of-text after each document, none inside


def test_config_with_a_transformers_base(tmp_path):
    from fixtures import make_run_dir

    from train.config import load_config
    from index.rundir import read_manifest

    manifest = read_manifest(make_run_dir(str(tmp_path / "run")))
    base = tiny_base(str(tmp_path / "base"), "qwen2")
    hf = [f"model={{hf: {base}}}"]
    cfg = load_config("tiny", hf + ["recipe.name=memory_only"], manifest)
    assert cfg.model.hf == os.path.abspath(base) and cfg.model.vocab_size == 320 and cfg.memory.kind == "ffn"
    with pytest.raises(ValueError, match="recipe.name=memory_only"):
        load_config("tiny", hf, manifest)  # tiny.yaml's recipe is cotrain: the base would train
    with pytest.raises(ValueError, match="memory.kind=ffn"):
        load_config("tiny", hf + ["recipe.name=memory_only", "memory.kind=lora"], manifest)
    with pytest.raises(ValueError, match="fixes the architecture"):
        load_config("tiny", ["recipe.name=memory_only", f"model.hf={base}"], manifest)  # tiny.yaml's d_model etc.
    small = tiny_base(str(tmp_path / "small"), "llama", vocab=100)
    with pytest.raises(ValueError, match="--tokenizer"):
        load_config("tiny", [f"model={{hf: {small}}}", "recipe.name=memory_only"], manifest)
