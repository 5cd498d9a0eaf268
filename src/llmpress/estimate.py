"""`--dry-run`: what a run would do and cost, from headers and config alone (no weights read,
nothing written): modules by kind, output size, peak memory and time, and for calibrated runs
the passes per layer and the activations held. Also the choice of one-pass propagation that the
memory cap allows, shared with the run itself.
"""

from __future__ import annotations

import logging
import os

from llmpress.config import CompressOptions
from llmpress.errors import LlmpressError
from llmpress.loop import STREAM_BYTES, is_streamed
from llmpress.plan import Plan, build_plan
from llmpress.source import ModelSource
from llmpress.stages import (
    checkpoint_dtype,
    compute_dtype,
    needs_calibration,
    needs_data,
    require_dataset,
    stages_of,
)

log = logging.getLogger(__name__)

# What a run holds besides its two resident layer groups: interpreter, torch, transformers and
# compressed-tensors (measured ~350 MB on 2.13/5.19/0.17), and a shard write buffer.
BASELINE_RSS_BYTES = 450 * 10**6


# Rough rate for the time estimate: measured 350-435 MB/s of input on 2 CPU cores (BENCHMARKS.md).
ESTIMATE_BYTES_PER_SECOND = 300 * 10**6


# Rough float32 matrix rate of calibration forward passes on 2 CPU cores (BENCHMARKS.md).
ESTIMATE_CALIBRATION_FLOPS = 60e9


def dry_run(
    model: str | os.PathLike, options: CompressOptions, max_memory: int | None = None
) -> dict:
    """What `run` would do, from headers and config alone: no weights are read, nothing is
    written. Fails as `run` would on a plan that cannot work (a static scheme without data)."""

    source = ModelSource.open(model)
    plan = build_plan(source, options)
    kinds: dict[str, int] = {}
    for name in plan.modules:
        kind = name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    resident = [  # streamed tensors (embeddings, head) are held STREAM_BYTES at a time
        STREAM_BYTES if is_streamed(source, plan, g) else sum(source.nbytes(n) for n in g)
        for g in source.tensors_by_layer()
    ]
    largest_two = sum(sorted(resident)[-2:])
    seconds = source.total_bytes / ESTIMATE_BYTES_PER_SECOND
    calibration = None
    activation_bytes = 0
    static = any(needs_calibration(g.scheme) for g in plan.groups)
    # GPTQ, AWQ, SmoothQuant, SparseGPT or Wanda observe the layers' inputs
    observed = any(a.needs for a in options.algorithms)
    if needs_data(plan, options):
        require_dataset(options)
        tokens = options.num_samples * options.seq_len  # at most: short texts give fewer
        hidden = getattr(source.config, "hidden_size", 0)
        in_layers = sum(
            source.nbytes(n) // source.tensor_entries[n].dtype.itemsize
            for g in source.tensors_by_layer()
            for n in g
            if source.layer_of(n) is not None
        )
        # Passes per layer: observe inputs (static scales, Hessians), observe the KV cache,
        # run compressed; with propagate "original" or "sequential" one pass in all.
        # 2 flops per weight and token.
        propagate = propagate_within(source, plan, options, max_memory)
        stages = stages_of(plan, options.independent, propagate)  # each its own passes
        two_pass = 1 + (static or observed) + (plan.kv_cache is not None)
        passes = sum(1 if stage.one_pass or stage.sequential else two_pass for stage in stages)
        seconds += passes * 2 * in_layers * tokens / ESTIMATE_CALIBRATION_FLOPS
        stored = checkpoint_dtype(source, plan)
        dtype = compute_dtype(options.device, stored, options.compute_dtype)
        # Hidden states in the compute dtype, two generations, of each stage.
        held = 2 * len(stages) * tokens * hidden * dtype.itemsize
        activation_bytes = held if max_memory is None else min(held, max_memory)
        if any(stage.sequential for stage in stages):  # the paused batches, all in memory
            activation_bytes = max(activation_bytes, sequential_bytes(source, plan, options))
        calibration = {
            "dataset": options.dataset,
            "samples": options.num_samples,
            "seq_len": options.seq_len,
            "seed": options.seed,
            "propagate": propagate or options.propagation,
            "max_tokens": tokens,
            "activation_bytes": held,
            "activation_bytes_in_memory": activation_bytes,
        }
    return {
        "model": str(source.path),
        "scheme": options.label,
        "kv_cache": options.kv_cache,
        "algorithm": " / ".join(options.method_names)
        + (" + static activation scales" if static else ""),
        "observer": options.observer,
        "quantized_modules": sum(plan.quantized(m) for m in plan.modules),
        "pruned_modules": len(plan.sparsity.modules) if plan.sparsity else 0,
        "modules_by_kind": kinds,
        "left_alone": list(plan.ignored),
        "input_bytes": source.total_bytes,
        "estimated_output_bytes": plan.estimated_output_bytes(source),
        "estimated_peak_rss_bytes": BASELINE_RSS_BYTES + largest_two + activation_bytes,
        "estimated_seconds": round(seconds, 1),
        "calibration": calibration,
    }


def sequential_bytes(source: ModelSource, plan: Plan, options: CompressOptions) -> int:
    """About the most a one-pass ("sequential") run holds of its paused batches: per token, a
    layer's input, its residual and normed states, the attention's or MLP's inner ones."""

    config = source.config
    hidden = getattr(config, "hidden_size", 0)
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    stored = checkpoint_dtype(source, plan)
    dtype = compute_dtype(options.device, stored, options.compute_dtype)
    return options.num_samples * options.seq_len * (4 * hidden + inner) * dtype.itemsize


def propagate_within(
    source: ModelSource, plan: Plan, options: CompressOptions, max_memory: int | None
):
    """`options.propagate`, or "compressed" where the default would be one pass
    ("sequential") but its paused batches would not fit in `max_memory`; an explicit
    "sequential" that does not fit is refused."""
    if max_memory is None or options.propagation != "sequential":
        return options.propagate
    need = sequential_bytes(source, plan, options)
    if need <= max_memory:
        return options.propagate
    if options.propagate == "sequential":
        raise LlmpressError(
            f"--propagate sequential holds about {need / 1e6:,.0f} MB of paused activations, "
            f"over --max-memory {max_memory / 1e6:,.0f} MB: raise --max-memory or use "
            "--propagate compressed"
        )
    log.info("two passes per layer: one would hold %.0f MB, over --max-memory", need / 1e6)
    return "compressed"
