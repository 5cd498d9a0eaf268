"""SmoothQuant: migrate activation outliers into the weights before W8A8 (Xiao et al., 2022,
arXiv:2211.10438).

Per-token activation quantization suffers from a few input channels with large magnitudes.
Dividing channel j of the activations by

    s_j = max|x_j|^α / max|W_:,j|^(1-α)     (α: the smoothing strength, default 0.5)

and multiplying the weights' column j by it (llmpress.algorithms.smoothing) balances the two ranges.
max|W_:,j| is taken over every Linear that reads the input, floored so that an all-zero
column (whose scaling changes nothing) cannot divide by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationScheme

from llmpress.algorithms.base import Need, Smoother
from llmpress.algorithms.smoothing import Mapping
from llmpress.errors import LlmpressError

# Floors that keep the scale finite for dead channels (never-active inputs, zero columns).
_MIN_WEIGHT = 1e-5
_MIN_SCALE = 1e-5


def smoothing_scale(
    mapping: Mapping,
    weights: list[torch.Tensor],
    input_absmax: torch.Tensor,
    strength: float,
) -> torch.Tensor:
    """The scale of `mapping`'s smooth channels. `weights`: the balance Linears' weights;
    `input_absmax`: max |x| per input column over the calibration tokens."""
    w_max = torch.cat([w.abs() for w in weights]).amax(dim=0).to(torch.float32)
    x_max = mapping.reduce(input_absmax.to(torch.float32))
    w_max = mapping.reduce(w_max).clamp_min(_MIN_WEIGHT)
    scale = x_max.pow(strength) / w_max.pow(1 - strength)
    return scale.clamp_min(_MIN_SCALE)


@dataclass(frozen=True, kw_only=True)
class _SmoothQuant(Smoother):
    def recipe_args(self, options, args: dict | None = None) -> dict:
        return dict(args or {}) | {"smoothing_strength": options.smoothing_strength}

    def check(
        self, scheme: QuantizationScheme | None, options, label: str = "", method: str = ""
    ) -> None:
        """SmoothQuant eases activation quantization: schemes that quantize activations."""
        if scheme is not None and scheme.input_activations is None:
            raise LlmpressError(
                f"--method {method} eases activation quantization; {label} "
                "keeps activations unquantized: use --method awq or gptq"
            )

    def choose_scale(self, mapping, balance, stats, hessian, args, observer, dtype, config):  # noqa: ANN001, ANN201
        return smoothing_scale(mapping, balance, stats.absmax(), config.smoothing_strength), {}


SMOOTHQUANT = _SmoothQuant(
    name="smoothquant",
    modifier="SmoothQuantModifier",
    needs=Need.CHANNELS,
    summary="migrate activation outliers into the weights (W8A8, FP8)",
    needs_data="SmoothQuant computes its scales from the layers' inputs",
    manifest="smoothing",
    options=("smoothing_strength",),
    every_mapping=False,
)
