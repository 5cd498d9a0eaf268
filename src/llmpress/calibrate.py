"""Static activation scales from calibration data, one decoder layer at a time.

For schemes whose input activations have static scales (FP8: one fp8 scale per tensor), every
quantized Linear's inputs are observed as calibration samples flow through the layer runner:
the running min and max over all samples give the scale, by compressed-tensors'
`calculate_qparams`, as for weights. The layer is then run again *compressed* (dequantized
weights, fake-quantized inputs), so the next layer calibrates on what it will see at inference.
With `--kv-cache` (any weight scheme), a pass in between runs the compressed layer and
observes what each attention caches (llmpress.kvcache); the last pass stores that in fp8.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
)

from llmpress.data import CalibrationSet
from llmpress.errors import LlmpressError
from llmpress.kvcache import KVCacheCalibration, attention_modules
from llmpress.packing import installed_layout, layouts_differ
from llmpress.plan import Plan
from llmpress.quantize import compress_layer, scheme_format
from llmpress.runner import LayerRunner
from llmpress.source import ModelSource


def needs_calibration(scheme: QuantizationScheme) -> bool:
    """Static input scales cannot be computed from weights alone."""
    acts = scheme.input_activations
    return acts is not None and acts.dynamic is False


class _InputRange:
    """Running min and max of a module's first input, over every sample."""

    def __init__(self):
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))

    def __call__(self, module, args):
        x = args[0]
        self.lo = torch.minimum(self.lo, x.min().float().cpu())
        self.hi = torch.maximum(self.hi, x.max().float().cpu())


def _dequantized(
    state: dict[str, torch.Tensor], scheme: QuantizationScheme, dtype: torch.dtype
) -> torch.Tensor:
    """A compressed weight back in `dtype`, as compressed-tensors decompresses it."""
    weight = state.get("weight")
    if weight is not None and weight.dtype == torch.float8_e4m3fn:
        return (weight.float() * state["weight_scale"].float()).to(dtype)
    compressor = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    return compressor.decompress(state, scheme)["weight"].to(dtype)


@contextlib.contextmanager
def _hooked(hooks: list) -> Iterator[None]:
    """Hooks in place for a block, removed after it (added to `hooks` inside it: removed too)."""
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


class StaticCalibration:
    """Compresses each decoder layer's planned modules and adds their input scales, and the
    k/v scales of its attention with `--kv-cache`."""

    def __init__(self, source: ModelSource, plan: Plan, calibration: CalibrationSet, device: str):
        static = needs_calibration(plan.scheme)  # else only the KV cache needs the data
        outside = [m for m in plan.modules if source.layer_of(f"{m}.weight") is None]
        if static and outside:
            raise LlmpressError(
                f"static activation scales are computed inside decoder layers; {outside[0]} is "
                "outside them: --ignore it"
            )
        if static and (plan.scheme.weights.type != "float" or plan.scheme.weights.num_bits != 8):
            raise LlmpressError("static activations are supported for FP8 only so far")
        self.plan, self.device = plan, device
        self.runner = LayerRunner(source, device)
        self.states = self.runner.capture(calibration.samples)
        self.input_args = plan.scheme.input_activations if static else None
        self.kv = KVCacheCalibration(plan.kv_cache) if plan.kv_cache is not None else None

    def compress(
        self,
        index: int,
        weights: dict[str, torch.Tensor],
        others: dict[str, torch.Tensor],
        observer: str,
        layout,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Layer `index`: observe its inputs, compress `weights` (by module name), run it
        compressed. `others`: the layer's remaining tensors (norms...), by full name."""
        read = {**others, **{f"{name}.weight": w for name, w in weights.items()}}
        layer = self.runner.load_layer(index, read)
        modules = self.runner.modules
        ranges = {name: _InputRange() for name in weights} if self.input_args else {}
        if ranges:
            with _hooked([modules[n].register_forward_pre_hook(r) for n, r in ranges.items()]):
                self.runner.forward_layer(index, self.states, update=False)
        packed = compress_layer(
            weights, self.plan.scheme, self.plan.fused, observer, self.device, layout
        )
        scales = {}
        for name in ranges:
            scale, zero_point = calculate_qparams(
                ranges[name].lo.reshape(1), ranges[name].hi.reshape(1), self.input_args
            )
            dtype = weights[name].dtype
            scales[name] = (scale.to(dtype), zero_point)
            packed[name]["input_scale"] = scale.to(dtype).reshape(1)
        # Run the layer as it will be served, so the next layer sees its real inputs.
        hooks = []
        for name, state in self._decompressible(packed, weights, observer, layout).items():
            module = modules[name]
            module.weight.data = _dequantized(state, self.plan.scheme, weights[name].dtype).to(
                self.device
            )
            quantize_input = self._input_quantizer(scales.get(name))
            if quantize_input is not None:
                hooks.append(module.register_forward_pre_hook(quantize_input))
        with _hooked(hooks):
            if self.kv is not None:
                # What the compressed layer caches: observed, then stored in fp8 as the next
                # layer's inputs are computed.
                attentions = attention_modules(layer, f"{self.runner.source.layer_prefix}.{index}.")
                with _hooked(self.kv.observe(attentions)):
                    self.runner.forward_layer(index, self.states, update=False)
                kv_scales = self.kv.scales(attentions)
                hooks += self.kv.quantize(attentions, kv_scales)
                packed.update(kv_scales)  # by attention module: its k_scale and v_scale
            self.runner.forward_layer(index, self.states)
        self.runner.unload_layer(index)
        del layer
        return packed

    def _input_quantizer(self, static: tuple[torch.Tensor, torch.Tensor] | None):
        """A pre-hook quantizing a module's input as served: by its static scale, or per call
        for dynamic activations (FP8_DYNAMIC, W8A8); None when inputs stay 16-bit."""
        args = self.plan.scheme.input_activations
        # Locally dynamic activations (NVFP4) also need a calibrated global scale: not yet.
        if args is None or (static is None and args.dynamic is not True):
            return None

        def quantize_input(module, inputs):
            x = inputs[0]
            if static is None:
                scale, zero_point = compute_dynamic_scales_and_zp(x, args, module)
            else:
                scale, zero_point = static[0].to(x.device), static[1]
            return (fake_quantize(x, scale, zero_point, args), *inputs[1:])

        return quantize_input

    def _decompressible(self, packed, weights, observer, layout):
        """`packed`, or for odd bit widths packed for another compressed-tensors (--packing),
        the same weights packed as the installed one reads them."""
        args = self.plan.scheme.weights
        if args.type != "int" or not layouts_differ(args.num_bits) or layout == installed_layout():
            return packed
        return compress_layer(
            weights, self.plan.scheme, self.plan.fused, observer, self.device, installed_layout()
        )
