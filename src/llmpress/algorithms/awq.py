"""AWQ: activation-aware scales for weight-only quantization (Lin et al., 2023,
arXiv:2306.00978).

Channels that carry large activations matter most; scaling them up in the weight (and down
in whatever produces the activation, llmpress.algorithms.smoothing) gives them finer quantization steps.
For each smoothing site a grid of exponents r in [0, 1) is tried,

    s = mean|x|^r / (mean|ŵ|^(1-r) + 1e-4)      (duo scaling; mean|x|^r without it)

normalized to a geometric mean of 1, where ŵ is the weight normalized per quantization group;
the s whose round-to-nearest weights give the smallest output error wins.

The output error of the balance Linears is computed from the second moment of their inputs,
H = mean(x xᵀ), as sum((ΔW H) ∘ ΔW) with ΔW = Q(W diag(s)) diag(s)⁻¹ - W: the same number as
running the calibration tokens through the quantized Linear, at a cost independent of their
count (rows x columns² per candidate instead of tokens x rows x columns). H is the Hessian
GPTQ accumulates anyway. The unsmoothed weight (s = 1) is always a candidate, so a site is
never made worse than round-to-nearest on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
)

from llmpress.algorithms.base import Need, Smoother
from llmpress.algorithms.columns import output_error, rtn_dequantized
from llmpress.algorithms.smoothing import Mapping
from llmpress.errors import LlmpressError
from llmpress.observers import global_scale

# Modules the clipping search leaves alone: queries and keys.
CLIP_SKIPPED = ("q_proj", "k_proj", "qkv_proj")


@dataclass
class SearchResult:
    scale: torch.Tensor  # one per smooth channel
    ratio: float | None  # the winning exponent; None: no scaling beat round-to-nearest
    loss_rtn: float
    loss: float


def weight_magnitude(weights: list[torch.Tensor], args: QuantizationArgs) -> torch.Tensor:
    """Per input column: mean over rows of |w| / max |w| of its quantization group."""
    rows = torch.cat(weights).abs()
    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        size = args.group_size
        grouped = rows.reshape(rows.shape[0], -1, size)
        normed = grouped / grouped.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        normed = normed.reshape(rows.shape)
    elif args.strategy == QuantizationStrategy.TENSOR:
        normed = rows / rows.amax().clamp_min(1e-12)
    else:  # channel, block: per row
        normed = rows / rows.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return normed.mean(dim=0)


def search_scale(
    mapping: Mapping,
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    input_magnitude: torch.Tensor,
    args: QuantizationArgs,
    observer: str,
    scale_dtype: torch.dtype,
    duo_scaling: bool = True,
    grid: int = 20,
) -> SearchResult:
    """The best scale for `mapping`'s smooth channels. `weights`: the balance Linears' weights
    (float32, on the compute device); `hessian`: mean(x xᵀ) of their common input;
    `input_magnitude`: mean |x| per input column; `grid`: exponents 0, 1/grid, ... tried."""
    x_mag = mapping.reduce(input_magnitude.to(torch.float32))
    w_mag = mapping.reduce(weight_magnitude(weights, args))

    def loss(scale: torch.Tensor | None) -> float:
        total = 0.0
        columns = None if scale is None else mapping.expand(scale)
        scaled = weights if columns is None else [w * columns for w in weights]
        tensor_group = args.strategy == QuantizationStrategy.TENSOR_GROUP
        gscale = global_scale(scaled) if tensor_group else None
        for w, s in zip(weights, scaled, strict=True):
            q = rtn_dequantized(s, args, observer, gscale, scale_dtype)
            if columns is not None:
                q = q / columns
            total += output_error(q - w, hessian)
        return total

    baseline = loss(None)
    best = SearchResult(torch.ones_like(x_mag), None, baseline, baseline)
    for step in range(grid):
        ratio = step / grid
        if duo_scaling:
            scale = x_mag.pow(ratio) / (w_mag.pow(1 - ratio) + 1e-4)
        else:
            scale = x_mag.pow(ratio)
        scale = scale.clamp_min(1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        value = loss(scale)
        if value < best.loss:
            best = SearchResult(scale, ratio, baseline, value)
    return best


# Clipping search: shrink factors 1, 1 - 1/CLIP_GRID, ... down to 1 - CLIP_MAX_SHRINK.
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5


@dataclass
class ClipResult:
    weight: torch.Tensor  # the weight with each group clipped to its best range
    mean_shrink: float
    loss_before: float
    loss: float


def clip_search(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    observer: str,
    scale_dtype: torch.dtype,
) -> ClipResult:
    """AWQ's clipping search: each quantization group's range is shrunk to the factor that
    minimizes its own output error, |ΔW_g x_g|² (from the group's diagonal block of H), where
    ΔW is the rounded clipped weight minus the original. Clipping a few outliers gives the
    rest of the group finer steps. Int weights in groups or per channel."""
    rows, columns = weight.shape
    size = args.group_size if args.strategy == QuantizationStrategy.GROUP else columns
    groups = columns // size
    blocks = torch.stack(
        [hessian[g * size : (g + 1) * size, g * size : (g + 1) * size] for g in range(groups)]
    )
    original = weight.reshape(rows, groups, size)
    lo, hi = original.amin(dim=-1, keepdim=True), original.amax(dim=-1, keepdim=True)
    if args.symmetric:
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi

    def group_error(candidate: torch.Tensor) -> torch.Tensor:
        q = rtn_dequantized(candidate.reshape(rows, columns), args, observer, None, scale_dtype)
        delta = (q.reshape(rows, groups, size) - original).transpose(0, 1)  # [groups, rows, size]
        return ((delta @ blocks) * delta).sum(-1).transpose(0, 1)  # [rows, groups]

    best = original.clone()
    best_error = group_error(original)
    shrink = torch.ones(rows, groups, device=weight.device)
    for step in range(1, int(CLIP_MAX_SHRINK * CLIP_GRID) + 1):
        factor = 1 - step / CLIP_GRID
        candidate = torch.minimum(torch.maximum(original, lo * factor), hi * factor)
        error = group_error(candidate)
        better = error < best_error
        best = torch.where(better.unsqueeze(-1), candidate, best)
        best_error = torch.where(better, error, best_error)
        shrink = torch.where(better, torch.full_like(shrink, factor), shrink)
    # Groups interact through H's off-diagonal blocks: report the whole output error.
    total = output_error(
        rtn_dequantized(best.reshape(rows, columns), args, observer, None, scale_dtype) - weight,
        hessian,
    )
    plain = rtn_dequantized(weight, args, observer, None, scale_dtype)
    before = output_error(plain - weight, hessian)
    if total >= before:
        return ClipResult(weight, 1.0, before, before)
    return ClipResult(best.reshape(rows, columns), float(shrink.mean()), before, total)


@dataclass(frozen=True, kw_only=True)
class _AWQ(Smoother):
    def recipe_args(self, options, args: dict | None = None) -> dict:
        out = dict(args or {}) | {"duo_scaling": options.duo_scaling, "n_grid": options.awq_grid}
        if options.awq_clip:  # llmpress' own option: llm-compressor 0.14 has no clipping
            out["llmpress_clip"] = True
        return out

    def check(
        self, scheme: QuantizationScheme | None, options, label: str = "", method: str = ""
    ) -> None:
        """AWQ protects weights whose activations are large: weight-only schemes."""
        if scheme is not None and scheme.input_activations is not None:
            raise LlmpressError(
                f"--method awq is for weight-only schemes (W4A16, W4A16_ASYM, NVFP4A16...); "
                f"{label} quantizes activations: use --method smoothquant+gptq"
            )

    def clippable(self, scheme: QuantizationScheme) -> bool:
        """The clipping search works on int weights in groups or channels."""
        return scheme.weights.type == "int" and scheme.weights.strategy in (
            QuantizationStrategy.GROUP,
            QuantizationStrategy.CHANNEL,
        )

    def choose_scale(self, mapping, balance, stats, hessian, args, observer, dtype, config):  # noqa: ANN001, ANN201
        result = search_scale(
            mapping,
            balance,
            hessian(),
            stats.abs_mean(),
            args,
            observer,
            dtype,
            config.duo_scaling,
            config.awq_grid,
        )
        entry = {"ratio": result.ratio, "loss_rtn": result.loss_rtn, "loss": result.loss}
        return result.scale, entry

    def finish(self, ctx, weights) -> None:  # noqa: ANN001
        """With --awq-clip: the clipping search on the smoothed weights of the modules this
        smoother rounds, but for q and k (their error passes through the attention softmax,
        which the output error does not see)."""
        if not ctx.config(self).awq_clip:
            return
        from llmpress.algorithms import smoother_of  # the registry imports this module

        plan, watch, device = ctx.plan, ctx.watch, ctx.device
        clipped = ctx.report["smoothing"].setdefault("clip", {})
        for name, weight in weights.items():
            skipped = name.rsplit(".", 1)[-1] in CLIP_SKIPPED
            if skipped or smoother_of(plan.method_of(name)) is not self:
                continue
            hessian = watch.hessians[name].mean(device)
            args = plan.scheme_of(name).weights
            result = clip_search(
                weight.to(device, torch.float32), hessian, args, ctx.observer, ctx.checkpoint_dtype
            )
            weights[name] = result.weight.to(weight.dtype)
            clipped[name] = {
                "mean_shrink": round(result.mean_shrink, 4),
                "loss_before": result.loss_before,
                "loss": result.loss,
            }


AWQ = _AWQ(
    name="awq",
    modifier="AWQModifier",
    needs=Need.HESSIAN | Need.CHANNELS,
    summary="activation-aware scales searched against the rounding error (weight-only schemes)",
    needs_data="AWQ searches its scales on the layers' inputs",
    propagation="original",
    manifest="smoothing",
    options=("duo_scaling", "awq_grid", "awq_clip"),
    every_mapping=True,
    quantizes_smoothed=True,
    clips=True,
)
