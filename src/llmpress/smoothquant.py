"""SmoothQuant: migrate activation outliers into the weights before W8A8 (Xiao et al., 2022,
arXiv:2211.10438).

Per-token activation quantization suffers from a few input channels with large magnitudes.
Dividing channel j of the activations by

    s_j = max|x_j|^α / max|W_:,j|^(1-α)     (α: the smoothing strength, default 0.5)

and multiplying the weights' column j by it (llmpress.smoothing) balances the two ranges.
max|W_:,j| is taken over every Linear that reads the input, floored so that an all-zero
column (whose scaling changes nothing) cannot divide by zero.
"""

from __future__ import annotations

import torch

from llmpress.smoothing import Mapping

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
