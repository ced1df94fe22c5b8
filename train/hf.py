"""transformers interop: project anchors as Llama checkpoints, and FFN memory on a pretrained Llama / Qwen2.

The module that imports transformers (train/export.py's ``export_transformers`` uses its name maps).

1. ``llama_config`` / ``llama_state_dict``: the anchor IS a Llama (RMSNorm, rotate-half RoPE with fp32
   angles, SwiGLU, no biases, optional tied embeddings), so a project export becomes a transformers
   ``LlamaForCausalLM`` checkpoint by renaming its weights, with bit-identical logits
   (``export_transformers`` in train/export.py).
2. ``HFAnchor``: a frozen transformers model behind the anchor's call signature
   ``forward(tokens, memory: Fetched | None) -> logits``. A forward hook on every decoder layer's MLP
   adds the path's FFN-memory units (``FFNLayerMemory.post_ffn``, the project's math), so the trainer,
   ``train.evaluate`` and ``hmem.query --model`` use it unchanged. ``model_config`` mirrors the
   checkpoint's shape in a ``ModelConfig`` whose ``hf`` / ``hf_sha256`` name the checkpoint; the
   content hash is checked on every load.
3. ``from_gguf(GGUF, HF_DIR)``: a local GGUF file (Llama, Qwen2; the format edge runtimes such as llama.cpp
   use) dequantised to an fp32 transformers checkpoint, so it can be the frozen base above. The
   directory's ``gguf_source.json`` names the source file (name, size, sha256); a rerun with the same
   file is a no-op.

The command line is train/hf_cli.py (``hmem-hf``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil

import torch
from torch import nn

from train.model import DecodeCache, ModelConfig

# model types whose MLP is down(silu(gate(x)) * up(x)): the FFN-memory units use the same activation
SUPPORTED = ("llama", "qwen2")

# project anchor name -> LlamaForCausalLM name (the layer index sits between prefix and suffix)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


# ---------------------------------------------------------------- 1. anchor -> transformers checkpoint


def llama_config(cfg: ModelConfig, eos_id: int, pad_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tied_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )


def llama_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Anchor weight names -> LlamaForCausalLM names (tensors shared, not copied)."""
    out = {}
    for name, t in state.items():
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = t
            continue
        _, i, rest = name.split(".", 2)  # layers.<i>.<rest>
        out[f"model.layers.{i}.{_LAYER_NAMES[rest]}"] = t
    return out


# ---------------------------------------------------------------- 2. a pretrained model as the frozen anchor


def content_hash(directory: str) -> str:
    """sha256 over config.json and the weight files (names and bytes, streamed): what the base IS."""
    names = sorted(n for n in os.listdir(directory) if n == "config.json" or n.endswith(".safetensors"))
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"{directory}: no *.safetensors weights (save the model with save_pretrained)")
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
        _hash_file(h, os.path.join(directory, n))
    return h.hexdigest()


def _hash_file(h, path: str):
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def _check_supported(config, directory: str) -> None:
    if config.model_type not in SUPPORTED or getattr(config, "hidden_act", None) != "silu":
        raise ValueError(
            f"{directory}: model type {config.model_type!r} (activation {getattr(config, 'hidden_act', None)!r}) "
            f"is not supported for FFN memory; supported: {list(SUPPORTED)} with SwiGLU (silu) MLPs"
        )


def model_config(directory: str, overrides: dict | None = None) -> ModelConfig:
    """The checkpoint's shape as a ModelConfig (``hf`` = its absolute path, ``hf_sha256`` = content hash)."""
    from transformers import AutoConfig

    if overrides:
        raise ValueError(f"model.hf fixes the architecture; remove the other model keys {sorted(overrides)}")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(
            f"model.hf: {directory}/config.json is missing; give a local transformers checkpoint directory"
        )
    c = AutoConfig.from_pretrained(directory, local_files_only=True)
    _check_supported(c, directory)
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        ffn_hidden=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        tied_embeddings=bool(c.tie_word_embeddings),
        rope_theta=float(theta),
        norm_eps=c.rms_norm_eps,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hf=os.path.abspath(directory),
        hf_sha256=content_hash(directory),
    )


class HFAnchor(nn.Module):
    """A transformers causal LM with the anchor's contract: ``forward(tokens, memory) -> logits`` and ``decode``.

    ``memory.layers(dtype)`` is built once per forward (once per decoded batch); the hook on layer i's MLP adds
    its units (out + silu(x Wg) * (x Wu) Wd), exactly the project anchor's FFN memory. Only FFN memory: LoRA /
    KV memory would need hooks inside the MLP / attention.
    """

    def __init__(self, model, cfg: ModelConfig):
        super().__init__()
        _check_supported(model.config, cfg.hf)
        self.model, self.cfg = model, cfg
        self._mems = None
        for i, layer in enumerate(model.model.layers):
            if not all(hasattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                raise ValueError(
                    f"{cfg.hf}: layer {i}'s MLP {type(layer.mlp).__name__} has no gate/up/down projections"
                )
            layer.mlp.register_forward_hook(self._ffn_hook(i))

    def _ffn_hook(self, i: int):
        def hook(module, args, out):
            return None if self._mems is None else self._mems[i].post_ffn(args[0], None, out)

        return hook

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _layer_memories(self, memory, batch: int) -> list | None:
        if memory is None:
            return None
        if memory.kind != "ffn":
            raise ValueError(f"a transformers base takes FFN memory only, not {memory.kind!r}")
        if memory.batch_size != batch:
            raise ValueError(f"memory fetched for {memory.batch_size} sequences, tokens hold {batch}")
        if memory.n_layers != self.cfg.n_layers:
            raise ValueError(f"memory has {memory.n_layers} layers, the model {self.cfg.n_layers}")
        return memory.layers(dtype=self.model.get_input_embeddings().weight.dtype)

    def forward(self, tokens: torch.Tensor, memory=None) -> torch.Tensor:
        self._mems = self._layer_memories(memory, tokens.shape[0])
        try:
            return self.model(input_ids=tokens, use_cache=False).logits
        finally:
            self._mems = None

    def decode(self, tokens: torch.Tensor, cache: DecodeCache, memory=None) -> torch.Tensor:
        """``Anchor.decode`` on the base: next-token logits [B, V] of right-padded prompts [B, T] (``cache`` made
        from their lengths), then of one token per sequence [B, 1] per call, on transformers' key/value cache.
        Each new token sits at its sequence's own position and the prompts' padding is masked out of every later
        attention, so it equals ``forward`` on each unpadded sequence up to float rounding."""
        from transformers import DynamicCache

        B, T = tokens.shape
        prompt = cache.past is None
        if prompt:  # the memory is gathered once, with the prompt
            cache.mems, cache.past = self._layer_memories(memory, B), DynamicCache()
            cache.keys = torch.arange(T)[None, :] < cache.next[:, None]
            positions = torch.arange(T).expand(B, T)
        else:
            cache.keys = torch.cat([cache.keys, torch.ones(B, 1, dtype=torch.bool)], dim=1)
            positions = cache.next[:, None]
        # the head only at each prompt's last token (a sorted index set shared by the batch)
        keep = torch.unique(cache.next - 1) if prompt else 0
        self._mems = cache.mems
        try:
            # the cache goes by position: transformers 5.x renames its keyword (past_key_values -> cache)
            logits = self.model(
                tokens, cache.keys.long(), positions, cache.past, use_cache=True, logits_to_keep=keep
            ).logits
        finally:
            self._mems = None
        if prompt:
            return logits[torch.arange(B), torch.searchsorted(keep, cache.next - 1)]
        cache.next = cache.next + 1
        return logits[:, 0]


def load_base(cfg: ModelConfig, device: str | torch.device = "cpu") -> HFAnchor:
    """The frozen base named by ``cfg.hf``, in fp32, offline; refuses a checkpoint whose hash differs."""
    from transformers import AutoModelForCausalLM

    have = content_hash(cfg.hf)
    if cfg.hf_sha256 and have != cfg.hf_sha256:
        raise ValueError(
            f"{cfg.hf}: content hash {have[:16]}... differs from the {cfg.hf_sha256[:16]}... this memory "
            "was trained on; a bank only fits the exact base it was trained with"
        )
    model = AutoModelForCausalLM.from_pretrained(cfg.hf, local_files_only=True, dtype=torch.float32)
    model.requires_grad_(False)
    return HFAnchor(model, cfg).to(device).eval()


# ---------------------------------------------------------------- 3. a GGUF file -> transformers checkpoint

SOURCE_RECORD = "gguf_source.json"


def package_gguf(package: str) -> str:
    """The one .gguf file an installed pip package ships (found without importing the package: its
    ``__init__`` may need runtimes this project does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    found = sorted(
        os.path.join(d, n) for d in spec.submodule_search_locations for n in os.listdir(d) if n.endswith(".gguf")
    )
    if len(found) != 1:
        raise FileNotFoundError(f"package {package!r} ships {len(found)} .gguf files {found}; pass --gguf FILE")
    return found[0]


def _gguf_fields(path: str) -> dict:
    """The GGUF header's scalar fields this conversion reads (the file is memory-mapped, not loaded)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    names = ("general.architecture", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")
    return {n: fields[n].contents() for n in names if n in fields}


def _check_saved(model, directory: str) -> None:
    """Every tensor in the written *.safetensors equals the loaded model's, read one at a time; a tensor
    left out must be tied to a written one (lm_head = embeddings)."""
    from safetensors import safe_open

    state = model.state_dict()
    saved = {}
    for n in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, n), "pt") as f:
            for key in f.keys():
                if key not in state or not torch.equal(f.get_tensor(key), state[key]):
                    raise RuntimeError(f"{directory}/{n}: {key} differs from the loaded GGUF weights")
                saved[key] = state[key].data_ptr()
    untied = [k for k in state if k not in saved and state[k].data_ptr() not in saved.values()]
    if untied:
        raise RuntimeError(f"{directory}: weights {untied} were not written")


def _gguf_source(gguf_path: str, fields: dict) -> dict:
    """gguf_source.json's description of the file (name, size, sha256, architecture): what tells a later run
    that OUT is this file's conversion. An architecture transformers cannot convert is refused here."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED:
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; supported: {list(SUPPORTED)}")
    return {
        "file": os.path.basename(gguf_path),
        "bytes": os.path.getsize(gguf_path),
        "sha256": _hash_file(hashlib.sha256(), gguf_path).hexdigest(),
        "architecture": arch,
    }


def _converted(out_dir: str, source: dict) -> bool:
    """Whether OUT already holds this file's conversion, unchanged since; refuses an OUT that holds anything
    else, which the conversion would replace."""
    record = os.path.join(out_dir, SOURCE_RECORD)
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
        if old["sha256"] == source["sha256"] and content_hash(out_dir) == old["hf_sha256"]:
            print(f"{out_dir}: already converted from {source['file']} (sha256 {source['sha256'][:16]}...)")
            return True
    elif os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(
            f"{out_dir} exists and is not a from-gguf output ({SOURCE_RECORD} missing); give a new directory"
        )
    return False


def _special_ids(gguf_path: str, fields: dict) -> tuple[int, int]:
    """The eos and pad token ids the GGUF names, set on the converted tokenizer and configs (pad = eos where
    it names none); a GGUF without an eos token is refused."""
    if "tokenizer.ggml.eos_token_id" not in fields:
        raise ValueError(f"{gguf_path}: the GGUF names no eos token (tokenizer.ggml.eos_token_id)")
    eos_id = int(fields["tokenizer.ggml.eos_token_id"])
    pad_id = int(fields.get("tokenizer.ggml.padding_token_id", eos_id))
    if "tokenizer.ggml.padding_token_id" not in fields:
        print(f"{gguf_path}: no padding token in the GGUF; pad = eos (id {eos_id})")
    return eos_id, pad_id


def _save_conversion(model, tok, record: dict, out_dir: str) -> None:
    """The checked checkpoint and its gguf_source.json ``record`` written beside OUT and moved in whole: an
    interrupted conversion leaves no half-written checkpoint."""
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _check_saved(model, tmp)
    with open(os.path.join(tmp, SOURCE_RECORD), "w") as f:
        json.dump({**record, "hf_sha256": content_hash(tmp)}, f, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)  # a previous conversion (checked by _converted)
    os.replace(tmp, out_dir)


def from_gguf(gguf_path: str, out_dir: str) -> str:
    """Dequantise a Llama / Qwen2 GGUF file to an fp32 transformers checkpoint (model, tokenizer with eos
    and pad, gguf_source.json); skipped when OUT already holds this file's conversion, unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    fields = _gguf_fields(gguf_path)
    source = _gguf_source(gguf_path, fields)
    if _converted(out_dir, source):
        return out_dir
    eos_id, pad_id = _special_ids(gguf_path, fields)

    src_dir, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    tok.eos_token, tok.pad_token = tok.convert_ids_to_tokens(eos_id), tok.convert_ids_to_tokens(pad_id)
    # dequantize=True: plain fp32 Linear layers even where a GGUF matmul kernel is installed, and no quantizer
    # state that would keep save_pretrained from writing them
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = eos_id, pad_id
    _save_conversion(model, tok, {**source, "eos_id": eos_id, "pad_id": pad_id}, out_dir)
    return out_dir
