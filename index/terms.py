"""The words of a text, as the router's lexical evidence: term hashes, a per-document Bloom filter, IDF.

A dense neighbour can be the wrong document: a sentence of an article is often nearer (in the
encoder's space) to another article on the same subject than to its own, and a bare question
("The atomic number of iron is") is as near to cobalt's documents as to iron's. The words settle
it: the router re-ranks its dense neighbours by the share of the query's words (IDF-weighted)
that each neighbour contains (index/router.py). This module is the one definition of a "term"
and of how a document's terms are stored; the Spark job (routed/ ``terms``), the document index
(its Bloom filters and document frequencies) and the router's queries all call it.

  term        a lowercase run of letters and digits (Unicode), hashed with CRC-32 (stable across
              processes and machines, unlike Python's ``hash``)
  terms(doc)  the distinct term hashes of a document's first ``MAX_TERMS`` distinct terms (a
              bounded record whatever the document's length), sorted
  Bloom       ``BLOOM_BYTES`` bytes per document, ``BLOOM_HASHES`` bit positions per term by
              double hashing; at ``MAX_TERMS`` terms a false positive costs ~3% of a word
  document    ``DF_BUCKETS`` counters of how many documents hold a term hashed into the bucket
  frequency   (a collision only makes a rare term look commoner: it weighs less, never more)
"""

from __future__ import annotations

import re
import zlib

import numpy as np

MAX_TERMS = 512  # distinct terms kept per document (the first ones in reading order)
BLOOM_BYTES = 512  # 4,096 bits: 3 bits per term at MAX_TERMS terms fill ~31% of them
BLOOM_HASHES = 3
DF_BUCKETS = 1 << 22  # 16 MB of uint32 document-frequency counters

_WORD = re.compile(r"[^\W_]+")


def term_hashes(text: str, limit: int = MAX_TERMS) -> np.ndarray:
    """Sorted distinct CRC-32 hashes (uint32) of the first ``limit`` distinct terms of ``text``."""
    seen: dict[str, None] = {}
    for w in _WORD.findall(text.lower()):
        if w not in seen:
            seen[w] = None
            if len(seen) == limit:
                break
    return np.unique(np.fromiter((zlib.crc32(w.encode()) for w in seen), dtype=np.uint32, count=len(seen)))


def _positions(hashes: np.ndarray) -> np.ndarray:
    """Bit positions [n, BLOOM_HASHES] of term hashes: h1 + i * h2 (double hashing), h2 odd."""
    h = hashes.astype(np.uint64)
    h1, h2 = h & np.uint64(0xFFFF), ((h >> np.uint64(16)) | np.uint64(1))
    i = np.arange(BLOOM_HASHES, dtype=np.uint64)
    return ((h1[:, None] + i[None, :] * h2[:, None]) % np.uint64(BLOOM_BYTES * 8)).astype(np.int64)


def blooms(hashes: np.ndarray, lengths: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Bloom filters uint8 [n, BLOOM_BYTES] of n documents whose term hashes are ``hashes`` (all documents'
    concatenated) with ``lengths[i]`` of them for document i. Memory: ``chunk`` x BLOOM_BYTES x 8 bytes."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    out = np.empty((len(lengths), BLOOM_BYTES), dtype=np.uint8)
    for a in range(0, len(lengths), chunk):
        b = min(a + chunk, len(lengths))
        pos = _positions(np.asarray(hashes[starts[a] : starts[b]], dtype=np.uint32))
        row = np.repeat(np.arange(b - a), lengths[a:b])
        bits = np.zeros((b - a, BLOOM_BYTES * 8), dtype=bool)
        bits[row[:, None], pos] = True
        out[a:b] = np.packbits(bits, axis=1, bitorder="little")
    return out


def contains(filters: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Whether each of ``filters`` [m, BLOOM_BYTES] (uint8) holds each term [n]: bool [m, n]."""
    pos = _positions(np.asarray(hashes, dtype=np.uint32))  # [n, H]
    byte, bit = pos >> 3, (pos & 7).astype(np.uint8)
    return ((filters[:, byte] >> bit) & 1).astype(bool).all(axis=2)


def df_buckets(hashes: np.ndarray) -> np.ndarray:
    return (np.asarray(hashes, dtype=np.uint32) % DF_BUCKETS).astype(np.int64)


def idf(hashes: np.ndarray, df: np.ndarray, n_documents: int) -> np.ndarray:
    """Smoothed inverse document frequency of each term, log((N + 1) / (df + 1)): 0 for a word in every document."""
    return np.log((n_documents + 1.0) / (df[df_buckets(hashes)].astype(np.float64) + 1.0))
