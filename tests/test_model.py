"""The anchor transformer: configs, parameter count, causality, loss masking."""

import pytest
import torch

from train.model import Anchor, ModelConfig, load_model_config


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("name", ["tiny", "demo", "paper160m"])
def test_named_configs_load(name):
    cfg = load_model_config(name)
    assert cfg.attn_dim == cfg.n_heads * cfg.head_dim


def test_paper160m_shape():
    cfg = load_model_config("paper160m")
    assert (cfg.n_layers, cfg.d_model, cfg.ffn_hidden, cfg.n_heads, cfg.head_dim) == (35, 512, 2048, 12, 32)
    assert cfg.tied_embeddings and cfg.attn_dim == 384
    with torch.device("meta"):  # shapes only, no memory
        model = Anchor(cfg)
    assert model.num_params() == cfg.num_params()
    assert 155e6 < cfg.num_params() < 170e6


def test_overrides_and_errors(tmp_path):
    cfg = load_model_config("tiny", vocab_size=321, max_seq_len=64)
    assert cfg.vocab_size == 321 and cfg.max_seq_len == 64
    p = tmp_path / "m.yaml"
    p.write_text("vocab_size: 10\nd_model: 8\nn_layers: 1\nn_heads: 2\nffn_hidden: 16\nmax_seq_len: 4\n")
    assert load_model_config(str(p)).d_model == 8
    p.write_text("vocab_size: 10\nd_model: 8\nn_layers: 1\nn_heads: 2\nffn_hidden: 16\nmax_seq_len: 4\nwidth: 3\n")
    with pytest.raises(ValueError, match="unknown model config keys"):
        load_model_config(str(p))
    with pytest.raises(FileNotFoundError, match="tiny"):
        load_model_config("no-such-preset")


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_formula(tied):
    cfg = small(tied_embeddings=tied, head_dim=6)
    assert Anchor(cfg).num_params() == cfg.num_params()


def test_forward_is_causal():
    torch.manual_seed(0)
    cfg = small()
    model = Anchor(cfg).eval()
    tok = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(tok)
    assert out.shape == (2, 12, cfg.vocab_size)
    tok2 = tok.clone()
    tok2[:, 7:] = (tok2[:, 7:] + 1) % cfg.vocab_size
    out2 = model(tok2)
    torch.testing.assert_close(out[:, :7], out2[:, :7])
    assert not torch.allclose(out[:, 7:], out2[:, 7:])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_forms_and_mask():
    torch.manual_seed(0)
    cfg = small()
    model = Anchor(cfg)
    tok = torch.randint(0, cfg.vocab_size, (3, 11))
    full = model.loss(tok)
    torch.testing.assert_close(full, model.loss((tok[:, :-1], tok[:, 1:])))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4] = True
    logits = model(tok[:1, :4])
    ref = torch.nn.functional.cross_entropy(logits[0], tok[0, 1:5])
    torch.testing.assert_close(model.loss(tok, mask), ref)
    # a [B, T+1] mask is aligned with tokens: its first column is dropped
    torch.testing.assert_close(model.loss(tok, torch.cat([torch.ones(3, 1, dtype=torch.bool), mask], 1)), ref)
    model.loss(tok, mask).backward()
    assert model.embed.weight.grad is not None
