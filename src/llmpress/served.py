"""A compressed layer as it will be served: weights dequantized as readers reconstruct them, and
inputs quantized as vLLM quantizes them (dynamic per-token, static, or NVFP4's group scales
under a static global one), so that the next layer calibrates on what it will see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

from llmpress.quantize import scheme_format
from llmpress.sparsity import zero_fraction


def dequantized_weight(
    state: dict[str, torch.Tensor], scheme: QuantizationScheme, dtype: torch.dtype
) -> torch.Tensor:
    """A compressed module's weight as its readers reconstruct it, in `dtype`."""
    args = scheme.weights
    per_row = args.strategy in (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL)
    if "weight" in state and per_row and "weight_zero_point" not in state:
        # float-quantized / int-quantized: one scale per tensor or per output row.
        return (state["weight"].to(torch.float32) * state["weight_scale"].to(torch.float32)).to(
            dtype
        )
    compressor = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    stored = {k: v for k, v in state.items() if k.startswith("weight")}
    return compressor.decompress(stored, scheme)["weight"].to(dtype)


def served_zeros(state: dict[str, torch.Tensor], scheme: QuantizationScheme | None) -> float:
    """The fraction of a stored module's weight that is zero as readers reconstruct it
    (`scheme` None: stored dense); pruned weights, and any rounded to zero."""
    weight = state["weight"] if scheme is None else dequantized_weight(state, scheme, torch.float32)
    return round(zero_fraction(weight), 6)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Quantize-dequantize with one static symmetric scale, as vLLM does (round to nearest
    even, saturate): compressed-tensors' fake_quantize, without its general machinery."""
    scaled = x / scale
    if args.type == QuantizationType.FLOAT:
        fmax = torch.finfo(torch.float8_e4m3fn).max
        q = scaled.clamp_(-fmax, fmax).to(torch.float8_e4m3fn).to(x.dtype)
    else:
        qmax = 2 ** (args.num_bits - 1)
        q = scaled.round_().clamp_(-qmax, qmax - 1)
    return q.mul_(scale)


@contextlib.contextmanager
def hooked(hooks: list) -> Iterator[None]:
    """Hooks in place for a block, removed after it (added to `hooks` inside it: removed too)."""
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


class InputQuantizer:
    """Forward pre-hooks that quantize each module's input as it will be at inference; a
    tensor handed to several modules with the same scales is quantized once."""

    def __init__(self, args: QuantizationArgs):
        self.args = args
        self._last: tuple[torch.Tensor | None, object, torch.Tensor | None] = (None, None, None)

    def hook(self, params: dict[str, torch.Tensor]):
        # By value: fused siblings (q/k/v, gate/up) hold equal scales in tensors of their own,
        # and their shared input is then quantized once.
        key = tuple(float(v) for v in params.values())

        def quantize_input(module, args):
            x = args[0]
            if self._last[0] is not x or self._last[1] != key:
                self._last = (x, key, self._quantize(x, params))
            return (self._last[2], *args[1:])

        return quantize_input

    def _quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        args = self.args
        if not params:  # dynamic (FP8_DYNAMIC, W8A8): scales per call, as served
            scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
            return fake_quantize(x, scale, zero_point, args)
        if "input_global_scale" in params:  # NVFP4: group scales at run time, global static
            gscale = params["input_global_scale"].to(x.device)
            scale, zero_point = compute_dynamic_scales_and_zp(
                value=x, args=args, module=None, global_scale=gscale
            )
            return fake_quantize(x, scale, zero_point, args, global_scale=gscale)
        scale = params["input_scale"].to(x.device, x.dtype)
        if args.symmetric:
            return quantize_static(x, scale, args)
        return fake_quantize(x, scale, params["input_zero_point"].to(x.device), args)
