"""`llmpress.json`: what a run did, for the user and for `--resume`: the source, the options,
the plan's modules and groups, the pruning as achieved, and what a resumed run must share with
the interrupted one (`run_identity`).
"""

from __future__ import annotations

import torch

from llmpress import __version__
from llmpress.config import CompressOptions
from llmpress.errors import LlmpressError
from llmpress.plan import Plan
from llmpress.source import ModelSource


def sparsity_report(source: ModelSource, plan: Plan, achieved: dict[str, float]) -> dict:
    """The manifest's account of the pruning: method, structure, and each pruned module's
    target and achieved fraction of zeros, with their average over all pruned weights."""
    sizes = {n: source.modules[n].weight.numel() for n in plan.sparsity.modules}
    missing = [n for n in sizes if n not in achieved]
    if missing:
        raise LlmpressError(f"internal: {missing[0]} was planned for pruning but not pruned")
    total = sum(sizes.values())
    return {
        "method": plan.sparsity.method,
        "structure": plan.sparsity.structure.label,
        "global_sparsity": round(sum(achieved[n] * sizes[n] for n in sizes) / total, 6),
        "modules": {
            n: {"target": plan.sparsity.modules[n], "achieved": achieved[n]} for n in sizes
        },
    }


def run_identity(source: ModelSource, options: CompressOptions, calibration) -> dict:
    """What a resumed run must share with the interrupted one to continue its output."""
    return {
        "llmpress": __version__,
        "source": str(source.path.resolve()),
        "source_bytes": source.total_bytes,
        "options": options.model_dump(mode="json"),
        "calibration": calibration.fingerprint,
    }


def build_manifest(source: ModelSource, plan: Plan, options: CompressOptions, shards: dict) -> dict:
    import compressed_tensors
    import transformers

    return {
        "tool": "llmpress",
        "llmpress_version": __version__,
        "versions": {
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "source": str(source.path),
        "source_bytes": source.total_bytes,
        "options": options.model_dump(mode="json"),
        "quantized_modules": len(plan.modules),
        "ignored_modules": list(plan.ignored),
        "shard_bytes": shards,
    }
