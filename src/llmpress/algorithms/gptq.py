"""GPTQ: quantize a weight one column at a time, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
(Frantar et al., 2022, arXiv:2210.17323; the structure follows the paper's reference code:
lazy block updates, Cholesky of the inverse Hessian, optional activation order).

The inputs' second moment H = mean(x xᵀ) is accumulated in float32 during the calibration
pass; modules that read the same tensor (q/k/v, gate/up) share one. Rows are independent
given H, so modules sharing a Hessian are solved together, stacked by rows: one pass of the
column loop for q, k and v instead of three.

Quantization parameters follow the scheme: per tensor, channel or block they are computed
once from the original weight; per group they are computed as the solve reaches each group,
from the updated weights (the classic GPTQ), or, with `actorder="static"`/`"weight"`, once from
the original weight while columns are visited in activation order. With `actorder="group"`
groups are formed in activation order and the checkpoint carries `weight_g_idx`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import compressed_tensors
import torch
from compressed_tensors.quantization import (
    ActivationOrdering,
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
)
from pydantic import ValidationError

from llmpress.algorithms.base import Need, Quantizer
from llmpress.algorithms.columns import (
    column_params,
    column_quantizer,
    group_args,
    output_error,
    rtn_dequantized,
    stored_scale,
)
from llmpress.algorithms.magnitude import magnitude_mask
from llmpress.algorithms.sparsegpt import Pruning, block_mask
from llmpress.errors import LlmpressError
from llmpress.observers import weight_qparams
from llmpress.sparsity import lowest_n_of_m

log = logging.getLogger(__name__)

# Damping retries when the damped Hessian is still not positive definite: x10 each time.
DAMPING_RETRIES = 4


def activation_order(actorder: str | None) -> str | None:
    """The canonical activation ordering of GPTQ's `actorder` option: None, "weight" or
    "group" ("static" is "weight", "dynamic" is "group")."""
    aliases = {"static": "weight", "dynamic": "group", "none": None}
    return aliases.get(actorder, actorder) if actorder else None


# Column panels of the Hessian's upper triangle: x xᵀ is symmetric, and computing only the
# panels on and above the diagonal does ~(n/PANEL + 1) / (2 n/PANEL) of the products, at the
# full float32 rate of the CPU (1.5x faster for 576-4096 columns, measured).
HESSIAN_PANEL = 256


@contextlib.contextmanager
def _bf16_products(enabled: bool) -> Iterator[None]:
    """float32 products computed by oneDNN from bf16-rounded inputs, summed in float32: exact
    for inputs that are bf16 values, at 1.4x the float32 rate on a CPU with bf16 units."""
    setting = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or setting is None or not hasattr(setting, "fp32_precision"):
        yield
        return
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


class Hessian:
    """The running mean of x xᵀ over every token a module group has read. On the CPU only its
    upper triangle is accumulated (`mean` mirrors it)."""

    def __init__(self, columns: int, device: torch.device | str, offload: bool = False):
        self.offload = offload
        self.sum = torch.zeros(
            columns, columns, dtype=torch.float32, device="cpu" if offload else device
        )
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.tokens += x.shape[0]
        if x.is_cuda:
            if x.dtype == torch.float32:
                product = x.t() @ x
            else:  # bf16/fp16 products summed in float32 by the GPU, without a copy of x
                product = torch.mm(x.t(), x, out_dtype=torch.float32)
            self.sum += product.to(self.sum.device)
            return
        total, n = self.sum, x.shape[1]
        exact_in_bf16 = x.dtype == torch.bfloat16  # computed in bf16: a CPU with bf16 units
        x = x.float()
        with _bf16_products(exact_in_bf16):
            for start in range(0, n, HESSIAN_PANEL):
                rows = slice(start, start + HESSIAN_PANEL)
                total[rows, start:].addmm_(x[:, rows].t(), x[:, start:])

    def divide(self, scale: torch.Tensor) -> None:
        """The Hessian of x / scale (per column), after smoothing divided the input."""
        scale = scale.to(self.sum.device, torch.float32)
        self.sum = self.sum / (scale.reshape(-1, 1) * scale.reshape(1, -1))

    def mean(self, device: torch.device | str) -> torch.Tensor:
        if self.tokens == 0:
            raise LlmpressError("a module saw no calibration tokens; GPTQ needs its inputs")
        upper = self.sum.triu()
        return ((upper + upper.triu(1).t()) / self.tokens).to(device)


@dataclass
class GPTQResult:
    """A solved weight: its values on the quantization grid (float32; pruned ones zero) and its
    stored parameters (None without quantization); the output error of round-to-nearest (after
    magnitude pruning of the same structure, when pruning) and of the solve on the calibration
    inputs (mean over tokens of |ΔW x|², summed over rows)."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
    loss_rtn: float
    loss: float
    damping: float
    seconds: float
    notes: list[str] = field(default_factory=list)


def _inverse_cholesky(
    hessian: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, float, list[str]]:
    """Upper Cholesky factor U of the damped inverse Hessian (H⁻¹ = UᵀU), retrying with larger
    damping when the factorization fails; returns it with the damping fraction used.

    With J the order-reversing permutation and JHJ = LLᵀ, U = J L⁻¹ J: one factorization and
    one triangular inverse (2/3 n³), rather than factor, invert and factor again (4/3 n³)."""
    notes = []
    mean_diag = float(torch.mean(torch.diag(hessian)))
    n = hessian.shape[0]
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    reversed_h = hessian.flip(0, 1)
    for attempt in range(DAMPING_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(reversed_h + eye * (fraction * mean_diag))
        if int(info) == 0:
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            upper = inverse.flip(0, 1)
            if bool(torch.isfinite(upper.diagonal()).all()):
                return upper, fraction, notes
        if attempt < DAMPING_RETRIES:
            notes.append(f"Cholesky failed at damping {fraction:g}; retrying at {fraction * 10:g}")
            fraction *= 10
    raise LlmpressError(
        f"the Hessian is not positive definite even at damping {fraction:g}; the calibration "
        "data may be too small for this layer (more --num-samples)"
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs | None,
    settings,  # noqa: ANN001 - GPTQ.config(...), or SPARSEGPT.config(...) to prune only
    observer: str = "minmax",
    global_scale: torch.Tensor | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
    prune: Pruning | None = None,
) -> GPTQResult:
    """GPTQ for one (possibly row-stacked) weight [rows, columns] given H = mean(x xᵀ) over its
    inputs [columns, columns]. Works in float32 on the weight's device. With `prune`
    (SparseGPT's own mask, not a fixed one) the weight is pruned by SparseGPT first, then
    quantized by GPTQ on the same Hessian with its zeros kept: quantization ranges are then
    those of the pruned weight, which the pruning's updates make larger than the original's
    (the SparseGPT paper's joint solve takes them from the original weight). `args` None:
    pruned only. `settings`: the solve's block size, damping and (quantizing) activation
    order, as the algorithm's config holds them."""
    if prune is not None and prune.fixed is None and args is not None:
        start = time.perf_counter()
        pruned = gptq_quantize(weight, hessian, None, settings, prune=prune)
        kept = Pruning(prune.structure, prune.sparsity, prune.rows, fixed=pruned.weight == 0)
        result = gptq_quantize(
            pruned.weight, hessian, args, settings, observer, global_scale, scale_dtype, kept
        )
        original = weight.to(torch.float32)
        hessian = hessian.to(original.device, torch.float32)
        result.loss = output_error(original - result.weight, hessian)
        result.loss_rtn = _baseline_error(
            original, hessian, args, prune, observer, global_scale, scale_dtype
        )
        result.damping = max(pruned.damping, result.damping)
        result.notes = pruned.notes + result.notes
        result.seconds = time.perf_counter() - start
        return result
    start = time.perf_counter()
    w = weight.to(torch.float32).clone()
    rows, columns = w.shape
    h = hessian.to(w.device, torch.float32).clone()
    grouped = args is not None and args.strategy in (
        QuantizationStrategy.GROUP,
        QuantizationStrategy.TENSOR_GROUP,
    )
    order = activation_order(settings.actorder) if args is not None else None
    if order == "group" and not grouped:
        order = "weight"  # without groups, the orders are the same thing
    if prune is not None and prune.structure.structured:
        order = None  # N:M blocks are runs of the original columns
    dead = torch.diag(h) == 0  # inputs that are always zero: any weight there is free
    h[dead, dead] = 1
    w[:, dead] = 0
    original = w.clone()

    # Upfront parameters: per tensor/channel/block always, per group with actorder=weight.
    upfront = args is not None and (not grouped or order == "weight")
    scale = zero_point = None
    if upfront:
        scale, zero_point = weight_qparams(w, args, observer, global_scale)
        scale = stored_scale(scale, args, scale_dtype)

    perm = None
    if order is not None:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    upper, damping, notes = _inverse_cholesky(h, settings.dampening_frac)

    g = args.group_size if grouped else None
    if grouped:
        n_groups = columns // g
        scales = [None] * n_groups
        zeros = [None] * n_groups
        if upfront:
            scales = [scale[:, i : i + 1] for i in range(n_groups)]
            zeros = [
                zero_point[:, i : i + 1] if zero_point is not None else None
                for i in range(n_groups)
            ]
    elif args is not None:
        params_of = column_params(scale, zero_point, args, rows)

    qdq, flat = column_quantizer(args, global_scale) if args is not None else (None, None)
    fixed = None
    if prune is not None and prune.fixed is not None:
        fixed = (prune.fixed[:, perm] if perm is not None else prune.fixed).t().contiguous()
    # Each column's scale and zero point as the quantizer takes them (`flat`), converted once
    # per group (or per tensor/channel).
    prepared: dict[object, tuple[torch.Tensor, torch.Tensor | None]] = {}
    reuse = grouped or args is None or args.strategy != QuantizationStrategy.BLOCK
    columns_in_order = perm.tolist() if perm is not None else range(columns)
    # The loop walks columns: it works on the transpose, where each column is contiguous.
    wt = w.t().contiguous()
    quantized = torch.zeros_like(wt)
    block_size = settings.block_size
    for b0 in range(0, columns, block_size):
        b1 = min(b0 + block_size, columns)
        w1 = wt[b0:b1].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[b0:b1, b0:b1]
        mask1 = None
        if fixed is not None:
            mask1 = fixed[b0:b1]
        elif prune is not None:
            mask1 = block_mask(w1, u1, prune) if not prune.structure.structured else None
            if mask1 is None:
                mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(b1 - b0):
            col = b0 + i  # position in processing order
            x = w1[i]
            if prune is not None and prune.structure.structured and fixed is None:
                m = prune.structure.m
                if i % m == 0:  # the next M columns' mask, from the weights as updated now
                    scores = w1[i : i + m] ** 2 / u1.diagonal()[i : i + m].reshape(-1, 1) ** 2
                    mask1[i : i + m] = lowest_n_of_m(scores.t(), prune.structure.n, m).t()
            if args is None:  # pruning only: the error is the pruned weights; the column
                # keeps its value (quantized at the block's end, below)
                e = torch.mul(x, mask1[i], out=err1[i]).div_(u1[i, i])
                w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1)
                continue
            original_col = columns_in_order[col]
            key = None
            if grouped:
                group = key = original_col // g if order != "group" else col // g
                if scales[group] is None:  # the group starts here (in processing order)
                    span = torch.cat([w1[i:], wt[b1 : col + g]])[:g].t()
                    s, z = weight_qparams(span, group_args(args, g), observer, global_scale)
                    scales[group] = stored_scale(s, args, scale_dtype)
                    zeros[group] = z
            params = prepared.get(key) if reuse else None
            if params is None:
                s, z = (scales[group], zeros[group]) if grouped else params_of(original_col)
                params = (flat(s), flat(z))
                if reuse:
                    prepared[key] = params
            q = qdq(x, *params)
            if mask1 is not None:
                q.masked_fill_(mask1[i], 0)
            quantized[col] = q
            e = torch.sub(x, q, out=err1[i]).div_(u1[i, i])
            w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1)
        if args is None:  # each column as the solve left it, pruned
            quantized[b0:b1] = w1.masked_fill_(mask1, 0)
        wt[b1:].addmm_(upper[b0:b1, b1:].t(), err1, alpha=-1)

    quantized = quantized.t()
    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        quantized = quantized[:, inverse]
        if order == "group":
            g_idx = (inverse // g).to(torch.int32)
    if grouped:
        scale = torch.cat(scales, dim=1)
        zero_point = torch.cat(zeros, dim=1) if zeros[0] is not None else None

    hessian = hessian.to(w.device, torch.float32)
    return GPTQResult(
        weight=quantized.contiguous(),
        scale=scale,
        zero_point=zero_point,
        g_idx=g_idx,
        loss_rtn=_baseline_error(
            original, hessian, args, prune, observer, global_scale, scale_dtype
        ),
        loss=output_error(original - quantized, hessian),
        damping=damping,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def _baseline_error(original, hessian, args, prune, observer, global_scale, scale_dtype) -> float:
    """The output error of the simple methods: round to nearest, after magnitude pruning of
    the same structure and budget when pruning."""
    baseline = original
    if prune is not None:
        baseline = original.clone()
        for rows_of in prune.slices(original.shape[0]):
            part = baseline[rows_of]
            part[magnitude_mask(part, prune.sparsity, prune.structure)] = 0
    if args is not None:
        baseline = rtn_dequantized(baseline, args, observer, global_scale, scale_dtype)
    return output_error(original - baseline, hessian)


def _check_actorder(scheme: QuantizationScheme, actorder: str) -> None:
    """Record GPTQ's activation order in the scheme, as readers expect it; group order needs
    int groups (readers reorder columns by `weight_g_idx`)."""
    args = scheme.weights
    if actorder in ("group", "dynamic"):
        if args.strategy != QuantizationStrategy.GROUP or args.type != "int":
            raise LlmpressError(
                f"--actorder {actorder} needs int weights in groups (W4A16, W8A16...); "
                f"{args.type} {args.strategy} weights take --actorder static or none"
            )
        if (refusal := group_actorder_refusal()) is not None:
            raise LlmpressError(
                f"--actorder {actorder}: compressed-tensors {compressed_tensors.__version__} "
                f"no longer reads group activation order ({refusal}), nor does vLLM; "
                "use --actorder static (the default), which orders columns at no run-time cost"
            )
        args.actorder = ActivationOrdering.GROUP
        log.warning(
            "--actorder %s stores weight_g_idx: transformers reads it with compressed-tensors "
            "< 0.19, vLLM 0.32 refuses it (group activation ordering is no longer supported "
            "there); serve --actorder static",
            actorder,
        )
    elif actorder != "none" and args.strategy == QuantizationStrategy.GROUP:
        args.actorder = ActivationOrdering.STATIC


def group_actorder_refusal() -> str | None:
    """The installed compressed-tensors' own error for `actorder="group"` (0.19 removed it),
    or None where it still reads it."""
    try:
        QuantizationArgs(num_bits=4, strategy="group", group_size=32, actorder="group")
    except ValidationError as error:
        return str(error.errors()[0]["msg"]).removeprefix("Value error, ")
    return None


@dataclass(frozen=True, kw_only=True)
class _GPTQ(Quantizer):
    def recipe_args(self, options, args: dict | None = None) -> dict:
        return dict(args or {}) | {
            "block_size": options.block_size,
            "dampening_frac": options.dampening_frac,
            "actorder": None if options.actorder == "none" else options.actorder,
            "offload_hessians": options.offload_hessians,
        }

    def check(
        self, scheme: QuantizationScheme | None, options, label: str = "", method: str = ""
    ) -> None:
        if scheme is not None:
            _check_actorder(scheme, options.actorder)

    def quantize(self, ctx, weights, scheme, masks):  # noqa: ANN001, ANN201
        """Solved on the Hessians of the modules' inputs, pruned modules pruned in the same
        solve (SparseGPT's choice, or the pruner's fixed `masks`)."""
        from llmpress.algorithms.solve import solve_modules  # it imports this module

        return solve_modules(ctx, weights, scheme, masks, ctx.config(self), self.manifest)


GPTQ = _GPTQ(
    name="gptq",
    modifier="GPTQModifier",
    needs=Need.HESSIAN,
    summary="error feedback through the inputs' Hessian, column by column (needs --dataset)",
    needs_data="GPTQ solves the weights on the layers' inputs",
    manifest="gptq",
    options=("block_size", "dampening_frac", "actorder", "offload_hessians"),
    solves=True,
)
