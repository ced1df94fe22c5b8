"""The anchor: a decoder-only transformer (RMSNorm, RoPE, SwiGLU, optional tied embeddings).

See docs/MODEL_API.md for the contract (names are fixed: the trainer codes against them).

The anchor knows nothing about where memories live. ``forward(tokens, memory)``
takes a ``train.memory.Fetched`` (the blocks of this batch's paths, already
read from the bank as leaf tensors); it is turned into per-layer weights ONCE
per forward (``memory.layers(dtype)``), and each layer calls three hooks on its
``LayerMemory``: ``attend`` (KV-memory), ``pre_ffn`` (LoRA on gate/up) and
``post_ffn`` (FFN-memory units, LoRA on down). With ``memory=None`` the anchor
is a plain transformer.

Named presets live in ``configs/model/<name>.yaml`` and are loaded with
``load_model_config(name_or_path, **overrides)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from index.config import build, find_yaml, read_yaml

if TYPE_CHECKING:  # the anchor only calls duck-typed hooks; no runtime import cycle
    from train.memory import Fetched, LayerMemory

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "model")


@dataclass
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_hidden: int
    max_seq_len: int
    tied_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int | None = None  # None: d_model // n_heads. The paper's 160M uses 12 heads of 32 (inner 384 != 512).
    init_std: float = 0.02
    # a local transformers checkpoint used as the (frozen) anchor instead of ``Anchor`` (train/hf.py),
    # and its content hash; the fields above then mirror its config
    hf: str | None = None
    hf_sha256: str | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}; set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def attn_dim(self) -> int:
        """Inner width of attention (n_heads * head_dim)."""
        return self.n_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count from the shapes (equals ``sum(p.numel())`` of an ``Anchor``)."""
        d, a, f, L, v = self.d_model, self.attn_dim, self.ffn_hidden, self.n_layers, self.vocab_size
        per_layer = 2 * d + 4 * d * a + 3 * d * f  # two norms, q/k/v/o, gate/up/down
        return v * d * (1 if self.tied_embeddings else 2) + L * per_layer + d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_model_config(name_or_path: str, **overrides) -> ModelConfig:
    """A named preset (``configs/model/<name>.yaml``) or a YAML file, with keyword overrides (e.g. vocab_size)."""
    path = find_yaml(name_or_path, CONFIG_DIR, "model config")
    raw = read_yaml(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return build(ModelConfig, raw, path, what="model config")


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # fp32 angles, in the order transformers' Llama computes them, so an export (train/hf.py) gives
    # bit-identical logits (fp64 tables differ from them by ~2e-5 at position 512)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv  # [T, hd/2]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd] with rotate-half pairing (i, i + hd/2); cos/sin [T, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position, in fp32 (bf16 logits lose the small differences), shaped like targets."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.attn_dim, bias=False)
        self.wo = nn.Linear(cfg.attn_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mem: "LayerMemory | None" = None, cache: "DecodeCache | None" = None, i: int = 0):
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None or not cache.k[i:]:  # the whole sequence, or a decode's prompt (cached for the steps)
            if cache is not None:
                cache.k.append(k)
                cache.v.append(v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, hd]
        else:  # one new token per sequence over its cached keys (a prompt's right padding masked out)
            k = cache.k[i] = torch.cat([cache.k[i], k], dim=2)
            v = cache.v[i] = torch.cat([cache.v[i], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.keys[:, None, None, :])
        if mem is not None:
            y = mem.attend(q, y)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x, mem: "LayerMemory | None" = None):
        g, u = self.w_gate(x), self.w_up(x)
        if mem is not None:
            g, u = mem.pre_ffn(x, g, u)
        h = F.silu(g) * u
        out = self.w_down(h)
        if mem is not None:
            out = mem.post_ffn(x, h, out)
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin, mem=None, cache=None, i: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mem, cache, i)
        return x + self.ffn(self.ffn_norm(x), mem)


class DecodeCache:
    """Greedy decoding state (``Anchor.decode``): per layer the keys and values of every position so far,
    which key positions are real tokens (a batch's prompts are right-padded), each sequence's next position,
    and the batch's memory gathered once. A transformers base (train/hf.py) keeps its own cache in ``past``."""

    def __init__(self, lengths: torch.Tensor):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.next = lengths.clone()  # [B] position of each sequence's next token
        self.keys: torch.Tensor | None = None  # [B, positions] bool
        self.mems: list = []  # per layer the memory hooks (train/memory.py), gathered with the prompt
        self.past = None  # transformers' key/value cache


class Anchor(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tied_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs scaled (GPT-2 style)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight")):
                p.normal_(0.0, out_std)
            else:
                p.normal_(0.0, std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, memory: "Fetched | None" = None) -> torch.Tensor:
        B, T = tokens.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens; max_seq_len is {self.cfg.max_seq_len}")
        x = self.embed(tokens)
        mems = self.layer_memories(memory, B, x.dtype)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer, mem in zip(self.layers, mems):
            x = layer(x, cos, sin, mem)
        return self.head(x)

    def layer_memories(self, memory: "Fetched | None", batch: int, dtype) -> list:
        """Per layer the batch's memory hooks (its blocks gathered once for all layers), or None per layer."""
        if memory is None:
            return [None] * len(self.layers)
        if memory.batch_size != batch:
            raise ValueError(f"memory fetched for {memory.batch_size} sequences, tokens hold {batch}")
        mems = memory.layers(dtype=dtype)
        if len(mems) != len(self.layers):
            raise ValueError(f"memory has {len(mems)} layers, the anchor {len(self.layers)}")
        return mems

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)

    def decode(self, tokens: torch.Tensor, cache: DecodeCache, memory: "Fetched | None" = None) -> torch.Tensor:
        """Logits of the next token per sequence [B, V], with a key/value cache: first the right-padded prompts
        [B, T] (``cache`` made from their lengths), then one token per sequence [B, 1] per call. Equals
        ``forward`` on each unpadded sequence up to float rounding (per-sequence rotary positions)."""
        B, T = tokens.shape
        prompt = not cache.k
        if int(cache.next.max()) + (0 if prompt else 1) > self.cfg.max_seq_len:
            raise ValueError(f"decoding past max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(tokens)
        if prompt:  # the memory is gathered once, with the prompt
            cache.mems = self.layer_memories(memory, B, x.dtype)
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            cache.keys = torch.arange(T)[None, :] < cache.next[:, None]
        else:  # each sequence at its own position: [B, 1, 1, hd/2] broadcasts over heads
            cos, sin = self.rope_cos[cache.next][:, None, None, :], self.rope_sin[cache.next][:, None, None, :]
            cache.keys = torch.cat([cache.keys, torch.ones(B, 1, dtype=torch.bool)], dim=1)
        for i, (layer, mem) in enumerate(zip(self.layers, cache.mems)):
            x = layer(x, cos, sin, mem, cache, i)
        last = x[torch.arange(B), cache.next - 1] if prompt else x[:, 0]
        if not prompt:
            cache.next = cache.next + 1
        return self.head(last)

    def loss(self, tokens, mask: torch.Tensor | None = None, memory: "Fetched | None" = None) -> torch.Tensor:
        """Mean next-token cross-entropy over masked target positions.

        ``tokens`` is [B, T+1] (inputs = tokens[:, :-1], targets = tokens[:, 1:]) or a pair
        ``(inputs [B, T], targets [B, T])``. ``mask`` (bool or 0/1) marks target positions that carry
        loss: [B, T], or [B, T+1] aligned with ``tokens`` (then its first column is dropped).
        """
        if isinstance(tokens, (tuple, list)):
            inputs, targets = tokens
        else:
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits = self(inputs, memory)
        ce = token_nll(logits, targets)
        if mask is None:
            return ce.mean()
        if mask.shape[1] == targets.shape[1] + 1:
            mask = mask[:, 1:]
        mask = mask.to(ce.dtype)
        return (ce * mask).sum() / mask.sum().clamp(min=1.0)
