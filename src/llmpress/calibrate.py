"""Static activation scales from calibration data, one decoder layer at a time.

For schemes whose input activations have static scales (FP8: one fp8 scale per tensor), every
quantized Linear's inputs are observed as calibration samples flow through the layer runner:
the running min and max over all samples give the scale, by compressed-tensors'
`calculate_qparams`, as for weights. The layer is then run again *compressed* (dequantized
weights, fake-quantized inputs), so the next layer calibrates on what it will see at inference.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from llmpress.data import CalibrationSet
from llmpress.errors import LlmpressError
from llmpress.plan import Plan
from llmpress.quantize import compress_layer
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


def _dequantized(state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """A float-quantized (fp8) weight back in `dtype`, as compressed-tensors decompresses it."""
    return (state["weight"].to(torch.float32) * state["weight_scale"].to(torch.float32)).to(dtype)


class StaticCalibration:
    """Compresses each decoder layer's planned modules and adds their input scales."""

    def __init__(self, source: ModelSource, plan: Plan, calibration: CalibrationSet, device: str):
        outside = [m for m in plan.modules if source.layer_of(f"{m}.weight") is None]
        if outside:
            raise LlmpressError(
                f"static activation scales are computed inside decoder layers; {outside[0]} is "
                "outside them: --ignore it"
            )
        if plan.scheme.weights.type != "float" or plan.scheme.weights.num_bits != 8:
            raise LlmpressError("static activations are supported for FP8 only so far")
        self.plan, self.device = plan, device
        self.runner = LayerRunner(source, device)
        self.states = self.runner.capture(calibration.samples)
        self.input_args = plan.scheme.input_activations

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
        ranges = {name: _InputRange() for name in weights}
        hooks = [modules[n].register_forward_pre_hook(r) for n, r in ranges.items()]
        try:
            self.runner.forward_layer(index, self.states, update=False)
        finally:
            for hook in hooks:
                hook.remove()
        packed = compress_layer(
            weights, self.plan.scheme, self.plan.fused, observer, self.device, layout
        )
        scales = {}
        for name, state in packed.items():
            scale, zero_point = calculate_qparams(
                ranges[name].lo.reshape(1), ranges[name].hi.reshape(1), self.input_args
            )
            dtype = weights[name].dtype
            scales[name] = (scale.to(dtype), zero_point)
            state["input_scale"] = scale.to(dtype).reshape(1)
        # Run the layer as it will be served, so the next layer sees its real inputs.
        hooks = []
        for name, state in packed.items():
            module = modules[name]
            module.weight.data = _dequantized(state, weights[name].dtype).to(self.device)
            scale, zero_point = scales[name]

            def quantize_input(mod, args, scale=scale, zero_point=zero_point):
                x = args[0]
                q = fake_quantize(x, scale.to(x.device), zero_point, self.input_args)
                return (q, *args[1:])

            hooks.append(module.register_forward_pre_hook(quantize_input))
        try:
            self.runner.forward_layer(index, self.states)
        finally:
            for hook in hooks:
                hook.remove()
        self.runner.unload_layer(index)
        del layer
        return packed
