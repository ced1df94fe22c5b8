"""transformers interop (train/hf.py): project anchors as Llama checkpoints, FFN memory on Llama / Qwen2."""
import json
import os

import pytest
import torch
from fixtures import write_tokenizer
from safetensors.torch import save_file

from train.export import FORMAT, load_model
from train.hf import export_anchor
from train.model import Anchor, ModelConfig


def project_export(d: str, tied: bool) -> str:
    """A project export directory (train/export.py layout) holding a randomly initialised anchor."""
    os.makedirs(d, exist_ok=True)
    vocab = write_tokenizer(os.path.join(d, "tokenizer.json"), 300)
    cfg = ModelConfig(vocab_size=vocab, d_model=48, n_layers=2, n_heads=3, ffn_hidden=96, max_seq_len=512,
                      tied_embeddings=tied, rope_theta=500.0, norm_eps=1e-6)
    torch.manual_seed(0)
    anchor = Anchor(cfg)
    with torch.no_grad():  # weights well away from the init scale: a harder equality test
        for p in anchor.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_file(anchor.state_dict(), os.path.join(d, "anchor.safetensors"))
    meta = {"format": FORMAT, "tree_version": "none", "k": 2, "depth": 1, "seq_len": 16, "eot_id": 0, "pad_id": 1,
            "model": cfg.to_dict(), "memory": None}
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    return d


@pytest.mark.parametrize("tied", [True, False])
def test_anchor_exports_as_llama_with_equal_logits(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tokenizers import Tokenizer

    src = project_export(str(tmp_path / "export"), tied)
    hf_dir = export_anchor(src, str(tmp_path / "hf"))
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
