"""The column solve on one resident layer's modules, which GPTQ (quantizing) and SparseGPT
(pruning) share: modules that read one input share its Hessian and are solved together,
stacked by rows, where their parameters are per row or group; each module's result goes to
the manifest section of the algorithm that asked.
"""

from __future__ import annotations

import logging

import torch
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy

from llmpress.algorithms.base import LayerContext, States, Weights
from llmpress.algorithms.gptq import gptq_quantize
from llmpress.algorithms.sparsegpt import Pruning
from llmpress.errors import LlmpressError
from llmpress.quantize import check_finite, global_scales

log = logging.getLogger(__name__)


def solve_modules(
    ctx: LayerContext,
    weights: Weights,
    scheme: QuantizationScheme | None,
    masks: Weights,
    settings,  # noqa: ANN001 - the asking algorithm's config: block size, damping, actorder
    section: str,
) -> States:
    """Solved states of one layer's modules of one scheme (None: pruned only). Pruned
    modules are pruned on the same Hessian: by SparseGPT, or by their fixed `masks`
    (Wanda's, magnitude's), the solve compensating the removals."""
    plan, device, hessians = ctx.plan, ctx.device, ctx.watch.hessians
    args = scheme.weights if scheme is not None else None
    on_device = {n: w.to(device) for n, w in weights.items()}
    gscales = global_scales(on_device, scheme, plan.fused) if scheme else {}
    stackable = args is None or args.strategy in (
        QuantizationStrategy.CHANNEL,
        QuantizationStrategy.GROUP,
        QuantizationStrategy.TENSOR_GROUP,
    )
    groups: dict[tuple, list[str]] = {}
    for name in weights:
        if name not in hessians:
            raise LlmpressError(f"{name} saw no calibration input; GPTQ cannot solve it")
        # Pruned and unpruned modules are solved apart (a share of a mixed stack is not its
        # own module's sparsity).
        groups.setdefault((id(hessians[name]), plan.pruned(name)), []).append(name)
    if stackable:
        solves = list(groups.values())
    else:  # per-tensor or per-block parameters: each module alone, on the shared Hessian
        solves = [[n] for members in groups.values() for n in members]
    states: States = {}
    for members in solves:
        hessian = hessians[members[0]].mean(device)
        stacked = torch.cat([on_device[m] for m in members])
        for m in members:
            check_finite(f"{m}.weight", on_device[m])
        result = gptq_quantize(
            stacked,
            hessian,
            args,
            settings,
            ctx.observer,
            gscales.get(members[0]),
            on_device[members[0]].dtype,
            _pruning(ctx, members, on_device, masks),
        )
        start = 0
        for m in members:
            rows = slice(start, start + on_device[m].shape[0])
            start = rows.stop
            state = {
                "weight": result.weight[rows],
                "weight_scale": _rows(result.scale, rows),
                "weight_zero_point": _rows(result.zero_point, rows),
            }
            if m in gscales:
                state["weight_global_scale"] = gscales[m].clone()
            if result.g_idx is not None:
                state["weight_g_idx"] = result.g_idx
            states[m] = state
            baseline = "loss_magnitude" if plan.pruned(m) else "loss_rtn"
            ctx.record(
                section,
                m,
                {
                    "solved_with": members,
                    baseline: result.loss_rtn,
                    "loss": result.loss,
                    "damping": result.damping,
                    "seconds": round(result.seconds, 3),
                },
            )
            for note in result.notes:
                log.warning("%s: %s", m, note)
        del hessian
    return states


def _pruning(ctx: LayerContext, members: list[str], weights: Weights, masks) -> Pruning | None:
    """What the solve of `members` (stacked) prunes, or None."""
    sparsity = ctx.plan.sparsity
    if not ctx.plan.pruned(members[0]):
        return None
    rows, start = [], 0
    for m in members:
        rows.append(slice(start, start + weights[m].shape[0]))
        start = rows[-1].stop
    fixed = torch.cat([masks[m] for m in members]) if masks else None
    target = sparsity.modules[members[0]]  # one layer's modules: one target
    return Pruning(sparsity.structure, target, tuple(rows), fixed)


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows of a per-row (channel or group) parameter; a per-tensor one is shared."""
    if tensor is None or tensor.numel() == 1:
        return tensor
    return tensor[rows]
