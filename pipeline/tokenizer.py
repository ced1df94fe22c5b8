"""The one owner of tokenizers: train, load and save. Needs `tokenizers` only (no torch, no Spark, no transformers).

Two kinds are read:
- a tokenizer.json the job trained or the user gave: ids 0 and 1 must be ``<|endoftext|>`` and ``<|pad|>``;
- a transformers tokenizer directory (a pretrained model's, train/hf.py): its tokenizer.json plus the eos / pad
  names in tokenizer_config.json (or special_tokens_map.json); pad falls back to eos.
A run directory and an export hold a tokenizer.json; `save_transformers` writes one as a directory that
transformers' AutoTokenizer reads.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT, PAD = "<|endoftext|>", "<|pad|>"
EOT_ID, PAD_ID = 0, 1


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with EOT = 0 and PAD = 1.

    A prefix space, as Llama's and T5's tokenizers add one: a text's first word gets the same token as inside
    a sentence ("The" -> "ĠThe"), so a question typed without a leading space reads like the sentence of a
    training document that states its fact (measured on the long-tail bench, docs/RESULTS.md).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def read(path: str) -> Tokenizer:
    """A tokenizer.json, or a one-line error naming it."""
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises plain Exception subclasses with multi-line text
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None


def load(path: str) -> tuple[Tokenizer, int, int]:
    """(tokenizer, eot id, pad id) of a tokenizer.json (EOT = 0, PAD = 1 required) or a transformers directory."""
    if os.path.isdir(path):
        return _load_transformers(path)
    tok = read(path)
    for name, want in ((EOT, EOT_ID), (PAD, PAD_ID)):
        if tok.token_to_id(name) != want:
            raise ValueError(
                f"{path}: token {name!r} must have id {want} (has {tok.token_to_id(name)}); "
                "add it as a special token or let the job train one"
            )
    return tok, EOT_ID, PAD_ID


def _special_name(value) -> str | None:
    """transformers writes a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _load_transformers(directory: str) -> tuple[Tokenizer, int, int]:
    file = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(
            f"{directory}: no tokenizer.json, so not a fast (tokenizers) tokenizer; save one with "
            "tokenizer.json (AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
        )
    tok = read(file)
    names = {}
    for meta in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
        meta_path = os.path.join(directory, meta)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                doc = json.load(f)
            names.update({k: _special_name(doc[k]) for k in ("eos_token", "pad_token") if doc.get(k)})
    if not names.get("eos_token"):
        raise ValueError(f"{directory}: the tokenizer names no eos token; set eos_token in tokenizer_config.json")
    ids = {k: tok.token_to_id(v) for k, v in names.items()}
    if ids["eos_token"] is None:
        raise ValueError(f"{directory}: eos token {names['eos_token']!r} is not in tokenizer.json's vocabulary")
    eos = int(ids["eos_token"])
    return tok, eos, int(ids["pad_token"]) if ids.get("pad_token") is not None else eos


def save_transformers(tokenizer_file: str, out_dir: str, eos_id: int, pad_id: int) -> None:
    """A run's tokenizer.json as a transformers fast-tokenizer directory with its eos / pad tokens named."""
    tok = read(tokenizer_file)
    eos, pad = tok.id_to_token(eos_id), tok.id_to_token(pad_id)
    if eos is None or pad is None:
        raise ValueError(f"{tokenizer_file}: eos id {eos_id} / pad id {pad_id} are not in its vocabulary")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "pad_token": pad}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
