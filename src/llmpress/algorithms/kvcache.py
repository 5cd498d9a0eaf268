"""FP8 KV cache: `k_scale` and `v_scale` per attention module, from calibration data.

A scale must fit the keys and values *as the cache stores them*: keys after the rotary
embedding (and after q/k norms, where a model has them), values as projected. Rather than
re-derive that per architecture, the attention module is handed a stand-in for transformers'
`Cache` (its public cache argument, `cache` or `past_key_values` by version): every attention
calls `cache.update(keys, values, layer_idx)` with exactly what it would store, and the
stand-in observes, or fake-quantizes, and hands them back. This is where compressed-tensors'
own `QuantizedKVCache` quantizes them when transformers loads the checkpoint, and what vLLM
writes to its cache with `k_scale`.

Scales are symmetric fp8 (e4m3), absmax / 448 over every calibration sample, by
compressed-tensors' `calculate_qparams`; stored in the attention's dtype, shaped as
compressed-tensors initializes them: `(1,)` per tensor, `(num_kv_heads, 1, 1)` per head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.lifecycle.initialize import is_attention_module
from compressed_tensors.quantization.utils import calculate_qparams
from torch import nn
from torch.utils.hooks import RemovableHandle

from llmpress.algorithms.base import Algorithm, Need, Role
from llmpress.errors import LlmpressError

# `--kv-cache` values, by compressed-tensors' kv_cache_scheme strategy.
KV_CACHE_STRATEGIES = {
    "fp8": QuantizationStrategy.TENSOR,
    "fp8-head": QuantizationStrategy.ATTN_HEAD,
}

Tensors = dict[str, torch.Tensor]


def kv_cache_args(choice: str) -> QuantizationArgs:
    """`quantization_config.kv_cache_scheme` for a `--kv-cache` value."""
    if choice not in KV_CACHE_STRATEGIES:
        raise LlmpressError(
            f"--kv-cache {choice!r} is not supported; use {' or '.join(KV_CACHE_STRATEGIES)}"
        )
    return QuantizationArgs(
        num_bits=8,
        type="float",
        strategy=KV_CACHE_STRATEGIES[choice],
        symmetric=True,
        dynamic=False,
    )


def attention_modules(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The modules that get k/v scales, by full name: compressed-tensors' own test, so that
    they are the modules transformers' loader gives `k_scale`/`v_scale` parameters."""
    return {
        f"{prefix}{name}": module
        for name, module in root.named_modules()
        if is_attention_module(module)
    }


class _CacheStandIn:
    """Passed as the attention's cache argument (`cache_argument`): stores nothing, lets
    `on_write` see (and replace) what the attention would store: keys and values
    `(batch, kv_heads, seq, head_dim)`."""

    def __init__(self, on_write: Callable[[torch.Tensor, torch.Tensor], tuple]):
        self.on_write = on_write

    def update(self, key_states, value_states, *args, **kwargs):
        return self.on_write(key_states, value_states)


# The attention's cache argument by transformers version, newest first: `cache` from 5.24
# (`past_key_values` still accepted until 5.40, renamed by a decorator), `past_key_values`
# before (transformers#39956), `past_key_value` in older models.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def cache_argument(attention: nn.Module) -> str:
    """The name under which `attention.forward` takes its `Cache`, from its signature."""
    params = inspect.signature(attention.forward).parameters
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    raise LlmpressError(
        f"{type(attention).__name__}.forward takes no KV cache argument (none of "
        f"{', '.join(CACHE_ARGUMENTS)}), so its k/v scales cannot be observed; drop --kv-cache"
    )


def _route_cache_writes(attention: nn.Module, on_write) -> RemovableHandle:
    name = cache_argument(attention)

    def hook(module, args, kwargs):
        kwargs[name] = _CacheStandIn(on_write)
        return args, kwargs

    return attention.register_forward_pre_hook(hook, with_kwargs=True)


def _head_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per head of `(batch, heads, seq, head_dim)`, in fp32 on the CPU."""
    lo, hi = torch.aminmax(x.transpose(0, 1).reshape(x.shape[1], -1), dim=1)
    return lo.float().cpu(), hi.float().cpu()


class KVCacheCalibration:
    """Running min and max of every attention's keys and values, then their scales."""

    def __init__(self, args: QuantizationArgs):
        self.args = args
        self.ranges: dict[str, dict[str, list[torch.Tensor]]] = {}

    def observe(self, attentions: dict[str, nn.Module]) -> list[RemovableHandle]:
        """Hooks that record what each attention stores; remove them after the pass."""

        def recorder(name: str):
            def on_write(keys, values):
                seen = self.ranges.setdefault(name, {})
                for kind, x in (("k", keys), ("v", values)):
                    lo, hi = _head_range(x)
                    if kind in seen:
                        lo, hi = torch.minimum(seen[kind][0], lo), torch.maximum(seen[kind][1], hi)
                    seen[kind] = [lo, hi]
                return keys, values

            return on_write

        return [_route_cache_writes(m, recorder(n)) for n, m in attentions.items()]

    def scales(self, attentions: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, Tensors]:
        """`k_scale` and `v_scale` of each attention, in `dtype` (the checkpoint's); their
        ranges are dropped."""
        out = {}
        for name, module in attentions.items():
            seen = self.ranges.pop(name, None)
            if seen is None:
                raise LlmpressError(
                    f"{name} ({type(module).__name__}) wrote no keys to a KV cache during "
                    "calibration, so it has no k/v scales; drop --kv-cache for this model"
                )
            out[name] = {f"{kind}_scale": self._scale(*seen[kind], dtype) for kind in "kv"}
        return out

    def _scale(self, lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.args.strategy == QuantizationStrategy.TENSOR:
            lo, hi = lo.min().reshape(1), hi.max().reshape(1)
        scale, _ = calculate_qparams(lo, hi, self.args)
        if self.args.strategy == QuantizationStrategy.ATTN_HEAD:
            scale = scale.reshape(-1, 1, 1)  # broadcasts over (batch, heads, seq, head_dim)
        return scale.to(dtype)

    def quantize(
        self, attentions: dict[str, nn.Module], scales: dict[str, Tensors]
    ) -> list[RemovableHandle]:
        """Hooks that fake-quantize what each attention stores with its scales, as
        compressed-tensors does when transformers runs the checkpoint."""

        def quantizer(found: Tensors):
            def on_write(keys, values):
                k_scale = found["k_scale"].to(keys.device, keys.dtype)
                v_scale = found["v_scale"].to(values.device, values.dtype)
                return (
                    fake_quantize(keys, k_scale, None, self.args).to(keys.dtype),
                    fake_quantize(values, v_scale, None, self.args).to(values.dtype),
                )

            return on_write

        return [_route_cache_writes(m, quantizer(scales[n])) for n, m in attentions.items()]


KV_CACHE = Algorithm(
    name="kv-cache",
    role=Role.CACHE,
    modifier="QuantizationModifier",  # its kv_cache_scheme
    needs=Need.LAYER_IO,
    summary="fp8 k/v scales of every attention, from what it caches (--kv-cache fp8|fp8-head)",
    needs_data="--kv-cache quantizes keys and values with static scales",
    options=("kv_cache",),
)
