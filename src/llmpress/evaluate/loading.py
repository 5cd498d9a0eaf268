"""A model to evaluate, loaded the way its users load it: transformers + compressed-tensors.

The dtype is the one the checkpoint was saved in, unless asked otherwise. That works for every
format: compressed-tensors decompresses into the checkpoint's dtype, and some formats only run
in it (NVFP4A16 loaded with `dtype=float32` fails in its forward with "expected m1 and m2 to
have the same dtype"). The base model is evaluated in the same dtype as the checkpoint, so
the comparison measures compression, not a dtype change.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from llmpress.errors import LlmpressError, first_line
from llmpress.source import resolve_model_dir

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module
    tokenizer: object
    dtype: torch.dtype
    quantization: str | None  # the checkpoint's compressed-tensors format, or None
    size_bytes: int
    # Why transformers runs this checkpoint without its quantized KV cache; None if it has
    # none or runs it (`kv_cache_not_applied`).
    kv_cache_note: str | None = None


@torch.inference_mode()
def kv_cache_not_applied(model: torch.nn.Module, device: str = "cpu") -> str | None:
    """Why the loaded `model` does not quantize its KV cache, or None where it does.

    For a checkpoint with a `kv_cache_scheme`, compressed-tensors gives each attention a
    `QuantizedKVCache` and passes it in as the attention's cache argument, by the names it
    knows (`past_key_values`, `past_key_value`). transformers 5.24 renamed that argument to
    `cache`, and up to 0.20.1 no compressed-tensors release follows: the checkpoint loads,
    and runs with an unquantized cache. Found by behaviour, for any version pair: one
    forward with a cache, counting what reaches compressed-tensors' caches.
    """
    from compressed_tensors.modeling.kvcache import QuantizedKVCache

    caches = [m for m in model.modules() if isinstance(m, QuantizedKVCache)]
    writes = []
    handles = [cache.register_forward_hook(lambda *_: writes.append(1)) for cache in caches]
    try:
        model(torch.zeros((1, 2), dtype=torch.int64, device=device), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    if writes:
        return None
    import compressed_tensors
    import transformers

    return (
        f"transformers {transformers.__version__} with compressed-tensors "
        f"{compressed_tensors.__version__} does not quantize the KV cache (its attention takes "
        "the cache under a name compressed-tensors does not hook): figures are without the "
        "checkpoint's kv_cache_scheme, which vLLM applies"
    )


def model_config(path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise LlmpressError(f"{path} is not a model: it has no config.json")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise LlmpressError(f"{config} is not valid JSON: {exc}") from exc


def size_on_disk(path: Path) -> int:
    """Bytes of the weight files (what compression shrinks), not tokenizer or config files."""
    files = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    if not files:
        raise LlmpressError(f"{path} is not a model: it holds no .safetensors or .bin weights")
    return sum(f.stat().st_size for f in files)


def saved_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


def resolve_dtype(dtype: str, config: dict) -> torch.dtype:
    if dtype == "auto":
        return saved_dtype(config)
    if dtype not in DTYPES:
        raise LlmpressError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' compressed-tensors loader draws progress bars and warns on every load;
    errors still surface as exceptions."""
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger("transformers").setLevel(level)


def load_model(
    model: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    tokenizer_from: Path | None = None,
) -> LoadedModel:
    """Load MODEL for evaluation; `tokenizer_from` supplies a tokenizer it lacks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(model)
    config = model_config(path)
    size = size_on_disk(path)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, config)
    quant = config.get("quantization_config") or {}
    try:
        with _quiet_loading(), torch.inference_mode():
            loaded = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, device_map=device
            ).eval()
            # A compressed checkpoint is decompressed by a hook on the first forward; run it
            # now, so that loading time is loading and evaluation time is evaluation.
            loaded(torch.zeros((1, 1), dtype=torch.int64, device=device))
    except Exception as exc:
        raise LlmpressError(
            f"transformers could not load {path} as a causal LM: {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from exc
    tokenizer = None
    for source in (path, tokenizer_from):
        if source is None:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            break
        except Exception:  # no tokenizer files here: try the next source
            continue
    if tokenizer is None:
        raise LlmpressError(f"{path} has no tokenizer files; pass --base to borrow the base's")
    note = kv_cache_not_applied(loaded, device) if quant.get("kv_cache_scheme") else None
    return LoadedModel(path, loaded.eval(), tokenizer, torch_dtype, quant.get("format"), size, note)
