"""What a calibrated run does per layer, decided before it starts: which groups need
calibration data for static input scales, the stages of a run (one, or one per modifier with
`--independent`) and what each stage's next layer calibrates on, and the dtype it computes in.

On a CPU without native 16-bit matrix units the layers are computed in float32: it runs float32
products several times faster than bfloat16 ones there, and bf16 values are exact in float32.
A CPU with AVX512-BF16 or AMX runs bf16 products ~2.5x faster than float32 ones, and computes a
bf16 checkpoint in bf16, as a GPU does (`compute_dtype`; `--compute-dtype float32` pins it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import (
    QuantizationScheme,
    QuantizationStrategy,
)

from llmpress.algorithms import (
    Role,
    algorithms_of,
    by_role,
    smoother_of,
)
from llmpress.config import CompressOptions, default_propagation, sequential_allowed
from llmpress.errors import LlmpressError
from llmpress.plan import Plan
from llmpress.schemes import CALIBRATED
from llmpress.source import ModelSource


def needs_calibration(scheme: QuantizationScheme) -> bool:
    """Static input scales (or NVFP4's static global input scale) need calibration data."""
    acts = scheme.input_activations
    if acts is None:
        return False
    return acts.dynamic is False or acts.strategy == QuantizationStrategy.TENSOR_GROUP


@dataclass(frozen=True)
class Stage:
    """One modifier's part of each layer's work: the groups whose smoothing sites it smooths
    and the groups it quantizes (by config group name); `one_pass`: its next layer calibrates
    on the outputs of its observing pass (propagate "original"), not of a compressed pass."""

    smooths: frozenset[str]
    quantizes: frozenset[str]
    one_pass: bool = False
    sequential: bool = False  # one pass, each module on its compressed predecessors' outputs


def stages_of(plan: Plan, independent: bool, propagate: str | None = None) -> list[Stage]:
    """The stages of a calibrated run. By default one: each layer is observed once and every
    modifier works on it. `independent`: one stage per modifier, in recipe order (the
    smoothing modifier, then the quantization modifier), each calibrated on its own hidden
    states, as separate runs would be: a stage sees the modules of the stages before it
    compressed, and those of the stages after it original. `propagate`: every stage's, or
    None for each stage's default, as its run alone would take it ("original" for AWQ;
    `CompressOptions.propagation`)."""
    every = frozenset(g.name for g in plan.groups)
    smoothed = frozenset(g.name for g in plan.groups if smoother_of(g.method) is not None)
    kv = plan.kv_cache is not None

    def stage(smooths: frozenset[str], quantizes: frozenset[str], prunes: bool = False) -> Stage:
        methods = [g.method for g in plan.groups if g.name in quantizes]
        if prunes:  # pruning changes the function: the next layer sees it, as GPTQ's
            methods.append(plan.sparsity.method)
        algorithms = algorithms_of(methods)
        if not quantizes and not prunes:  # it only smooths, keeping the function: one pass
            mode = "compressed" if propagate == "compressed" else "original"  # gives the same
        else:
            mode = propagate or default_propagation(algorithms, kv)
        smoothing = algorithms_of(g.method for g in plan.groups if g.name in smooths)
        if mode == "sequential" and not sequential_allowed(algorithms + smoothing, kv):
            raise LlmpressError(
                "--propagate sequential compresses each module as soon as its inputs are "
                "seen; smoothing (AWQ, SmoothQuant) and --kv-cache need a whole layer "
                "observed first: use --propagate compressed"
            )
        return Stage(smooths, quantizes, mode == "original", mode == "sequential")

    if not independent:  # pruning (never independent) is the one stage's
        return [stage(smoothed, every, plan.sparsity is not None)]
    stages = []
    if smoothed:  # AWQ rounds the groups it smooths; SmoothQuant leaves them to the quantizer
        rounded = frozenset(
            g.name
            for g in plan.groups
            if (smoother := smoother_of(g.method)) is not None and smoother.quantizes_smoothed
        )
        stages.append(stage(smoothed, rounded))
    rest = every - (stages[0].quantizes if stages else frozenset())
    if rest:
        stages.append(stage(frozenset(), rest))
    return stages


def checkpoint_dtype(source: ModelSource, plan: Plan) -> torch.dtype:
    """The dtype the checkpoint stores its weights in: that of the first module planned."""
    return source.tensor_entries[f"{plan.modules[0]}.weight"].dtype


def compute_dtype(device: str, checkpoint_dtype: torch.dtype, choice: str = "auto") -> torch.dtype:
    """The dtype calibration computes in (`choice`: "auto", "float32" or "bfloat16")."""
    if choice != "auto":
        return getattr(torch, choice)
    if not device.startswith("cpu"):
        return checkpoint_dtype
    if checkpoint_dtype == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), through
    oneDNN: then bf16 products run ~2.5x faster than float32 ones, else several times slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def require_dataset(options: CompressOptions) -> None:
    if options.dataset is not None:
        return
    pruner = options.pruner
    if pruner is not None and pruner.needs_data:
        free = " or ".join(p.name for p in by_role(Role.PRUNE) if not p.needs_data)
        raise LlmpressError(
            f"{pruner.needs_data}, computed from calibration text: give --dataset (e.g. "
            f"pydoc-calibration, or a .txt/.jsonl file), or prune by --method {free}"
        )
    if (algorithm := options.smoother or options.solver) is not None:
        what = algorithm.needs_data
    elif options.kv_cache and not any(
        (g.scheme or "").upper() in CALIBRATED for g in options.scheme_groups
    ):
        what = f"--kv-cache {options.kv_cache} quantizes keys and values with static scales"
    else:
        what = f"{options.label} quantizes activations with static scales"
    raise LlmpressError(
        f"{what}, computed from calibration text: give --dataset (e.g. "
        "pydoc-calibration, or a .txt/.jsonl file)"
    )


def needs_data(plan: Plan, options: CompressOptions) -> bool:
    """Whether the run calibrates on text: static activation scales, the KV cache, GPTQ, AWQ,
    SmoothQuant, SparseGPT or Wanda; round to nearest and magnitude pruning need none."""
    from llmpress.stages import needs_calibration

    static = any(needs_calibration(g.scheme) for g in plan.groups)
    pruning = plan.sparsity is not None and plan.sparsity.needs_data
    solving = any(a.needs_data for a in algorithms_of(options.methods))
    return static or pruning or plan.kv_cache is not None or solving
