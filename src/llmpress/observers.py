"""Weight observers: the scale and zero point of each group, by min-max or by a clipping search.

Scales come from compressed-tensors' `calculate_qparams` (the same arithmetic vLLM and
llm-compressor use); the observers only decide the range each group is mapped onto.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from llmpress.errors import LlmpressError

# The clipping search of `--observer mse`: shrink each group's range by up to 20 % in 1 % steps
# and keep the shrink with the lowest |error|^2.4 (the norm the GPTQ/AWQ literature uses).
MSE_MAX_SHRINK = 0.20
MSE_STEPS = 20
MSE_NORM = 2.4


def grouped(weight: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """View a 2-D weight as (*scale_shape, elements_per_scale), in the weight's dtype.

    Scale shapes follow compressed-tensors: tensor [1], channel [out, 1], group [out, in/g],
    block [ceil(out/bh), ceil(in/bw)] (edge blocks padded with zeros, which never widen a range).
    """
    w = weight
    out_f, in_f = w.shape
    strategy = args.strategy
    if strategy == QuantizationStrategy.TENSOR:
        return w.reshape(1, -1)
    if strategy == QuantizationStrategy.CHANNEL:
        return w.reshape(out_f, 1, in_f)
    if strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        g = args.group_size
        if in_f % g:
            raise LlmpressError(f"group size {g} does not divide in_features {in_f}")
        return w.reshape(out_f, in_f // g, g)
    if strategy == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        rows, cols = -(-out_f // bh), -(-in_f // bw)
        w = torch.nn.functional.pad(w, (0, cols * bw - in_f, 0, rows * bh - out_f))
        return w.reshape(rows, bh, cols, bw).permute(0, 2, 1, 3).reshape(rows, cols, bh * bw)
    raise LlmpressError(f"weight strategy {strategy!r} is not supported for weights")


def global_scale(weights: list[torch.Tensor]) -> torch.Tensor:
    """NVFP4's per-tensor scale, shared by modules vLLM fuses (q/k/v, gate/up): one amax."""
    amax = torch.stack([w.detach().abs().amax().float() for w in weights]).amax()
    return generate_gparam(-amax.reshape(1), amax.reshape(1))


class NonFiniteWeight(ValueError):
    """A weight holds NaN or Inf: found by the observer's min/max, at no extra pass."""


def group_range(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    # In the weight's own dtype, where min and max are exact. Separate amin and amax run
    # twice as fast as a fused aminmax over short groups (vectorized reductions on CPU).
    groups = grouped(weight, args)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    lo, hi = lo.float(), hi.float()  # NaN survives both steps
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise NonFiniteWeight
    return lo, hi


def minmax_qparams(
    weight: torch.Tensor, args: QuantizationArgs, gscale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = group_range(weight, args)
    return calculate_qparams(lo, hi, args, global_scale=gscale)


def mse_qparams(
    weight: torch.Tensor, args: QuantizationArgs, gscale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the shrunken min-max range whose quantization error is smallest."""
    lo, hi = group_range(weight, args)
    w = weight.float()
    best_err = torch.full(lo.shape, float("inf"))
    best_scale, best_zp = calculate_qparams(lo, hi, args, global_scale=gscale)
    for step in range(MSE_STEPS + 1):
        shrink = 1.0 - MSE_MAX_SHRINK * step / MSE_STEPS
        scale, zp = calculate_qparams(lo * shrink, hi * shrink, args, global_scale=gscale)
        dq = fake_quantize(w, scale, zp, args, global_scale=gscale)
        err = grouped((dq.float() - w).abs().pow(MSE_NORM), args).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


OBSERVERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "minmax": minmax_qparams,
    "mse": mse_qparams,
}


def weight_qparams(
    weight: torch.Tensor,
    args: QuantizationArgs,
    observer: str = "minmax",
    gscale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for `weight`, shaped as compressed-tensors stores them."""
    if observer not in OBSERVERS:
        raise LlmpressError(f"unknown observer {observer!r}; choose {' or '.join(OBSERVERS)}")
    return OBSERVERS[observer](weight, args, gscale)
