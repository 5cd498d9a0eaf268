"""A smoother's work on one resident decoder layer (`Smoother.apply`): its smoothing sites,
found on the first layer by one real forward and the same in every layer, then each site's
scale chosen by the smoother on what was observed and applied in order, to the layer, to the
tensors the checkpoint will store, and to the observed statistics, which become those of the
smoothed inputs (the Hessians too, for the quantizer that follows).
"""

from __future__ import annotations

import logging

import torch

from llmpress.algorithms.smoothing import Mapping, apply_scale, infer_mappings, load_tensors
from llmpress.errors import LlmpressError

log = logging.getLogger(__name__)


def smooth_layer(smoother, ctx, weights: dict, others: dict, groups) -> None:  # noqa: ANN001
    """Choose and apply the scales of each of the layer's sites whose readers are in config
    `groups`, in order: `weights` and `others` (the checkpoint's tensors, written later) and
    the resident layer take the smoothed values, and the statistics observed (`ctx.watch`)
    become those of the smoothed inputs."""
    mappings = ctx.state[smoother.name]
    prefix, watch, device, plan = ctx.prefix, ctx.watch, ctx.device, ctx.plan
    report = ctx.report["smoothing"]
    config = ctx.config(smoother)
    tensors = {f"{n[len(prefix) :]}.weight": w for n, w in weights.items()}
    tensors.update({k[len(prefix) :]: v for k, v in others.items() if k.startswith(prefix)})
    before = dict(tensors)
    static = watch.ranges  # static input scales: their ranges are the smoothed inputs'
    for mapping in mappings:
        members = [prefix + b for b in mapping.balance]
        if plan.group_of(members[0]).name not in groups:
            continue  # its readers' group is not smoothed (several methods in one run)
        stats = watch.channels[members[0]]
        balance = [tensors[f"{b}.weight"].to(device, torch.float32) for b in mapping.balance]
        scale, entry = smoother.choose_scale(
            mapping,
            balance,
            stats,
            lambda: watch.hessians[members[0]].mean(device),  # noqa: B023 - called at once
            plan.scheme_of(members[0]).weights,
            ctx.observer,
            ctx.checkpoint_dtype,
            config,
        )
        entry["scale_range"] = [float(scale.min()), float(scale.max())]
        report["sites"][f"{prefix}{mapping.smooth}"] = entry
        apply_scale(mapping, scale, tensors)
        columns = mapping.expand(scale)
        stats.divide(columns)
        if watch.hessians is not None:  # each its own object where experts read copies
            held = (watch.hessians[m] for m in members if m in watch.hessians)
            for hessian in {id(h): h for h in held}.values():
                hessian.divide(columns)
        if static:
            for m in members:
                watch.lo[m], watch.hi[m] = stats.lo.min().cpu(), stats.hi.max().cpu()
    for name in weights:
        weights[name] = tensors[f"{name[len(prefix) :]}.weight"]
    smoother.finish(ctx, weights)
    changed = {k: v for k, v in tensors.items() if v is not before[k]}
    for key, value in changed.items():
        if prefix + key in others:
            others[prefix + key] = value
    load_tensors(
        ctx.runner.layers[ctx.index], {k: ctx.runner.placed(v) for k, v in changed.items()}
    )


def find_sites(smoother, ctx, weights) -> None:  # noqa: ANN001
    """Before the first layer's first pass: the smoothing sites `smoother` works on, found
    on one real forward of it, kept for every layer (`ctx.state`)."""
    if smoother.name not in ctx.state:
        ctx.state[smoother.name] = _mappings(smoother, ctx, weights)


def _mappings(smoother, ctx, weights) -> list[Mapping]:  # noqa: ANN001
    """The layer's smoothing sites that `smoother` works on, found on one real forward."""
    runner, prefix, index = ctx.runner, ctx.prefix, ctx.index
    balance = {name[len(prefix) :] for name in weights}
    config = runner.source.config
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    layer = runner.layers[index]
    found = infer_mappings(layer, balance, lambda: runner.forward_batch(index), head_dim)
    mappings = [m for m in found.mappings if smoother.wants(m)]
    left = [m.name for m in found.mappings if not smoother.wants(m)]
    for reason in found.skipped:
        log.warning("%s: mapping skipped: %s", smoother, reason)
    if not mappings:
        raise LlmpressError(
            f"{smoother}: no smoothing mapping applies to this model's layers"
            + (f" ({'; '.join(found.skipped)})" if found.skipped else "")
        )
    log.info("%s mappings: %s", smoother, ", ".join(m.name for m in mappings))
    unused = [f"{name}: not used by {smoother}" for name in left]
    ctx.report["smoothing"].update(
        method=smoother.name, mappings=[m.name for m in mappings], skipped=found.skipped + unused
    )
    ctx.report["smoothing"].setdefault("sites", {})
    return mappings
