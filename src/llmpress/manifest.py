"""`llmpress.json`: what a run did, for the user and for `--resume`: the source, the options,
the plan's modules and groups, the pruning as achieved, the size and sha256 of every file read
and written (checked by `llmpress verify`), and what a resumed run must share with the
interrupted one (`run_identity`).
"""

from __future__ import annotations

import torch

from llmpress import __version__
from llmpress.config import CompressOptions
from llmpress.errors import LlmpressError
from llmpress.plan import Plan
from llmpress.provenance.verify import SCHEMA_VERSION
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


def environment(device: str) -> dict:
    """Where the run ran, without time stamps or host names: python, the platform, the
    llmpress git commit when run from a checkout, and the device (with its driver's CUDA)."""
    import platform

    found = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "llmpress_commit": _git_commit(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        found["device_name"] = torch.cuda.get_device_name(torch.device(device))
        found["cuda"] = torch.version.cuda
    return found


def _git_commit() -> str | None:
    """The commit of the checkout llmpress runs from, or None (an installed package)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    commit = done.stdout.strip() if done.returncode == 0 else ""
    return commit or None


def run_identity(source: ModelSource, options: CompressOptions, calibration) -> dict:
    """What a resumed run must share with the interrupted one to continue its output."""
    return {
        "llmpress": __version__,
        "source": str(source.path.resolve()),
        "source_bytes": source.total_bytes,
        "options": options.model_dump(mode="json"),
        "calibration": calibration.fingerprint,
    }


def build_manifest(
    source: ModelSource,
    plan: Plan,
    options: CompressOptions,
    shards: dict,
    inputs: dict[str, dict],
    outputs: dict[str, dict],
) -> dict:
    """`inputs`, `outputs`: size and sha256 of every file read and written, by name relative
    to the model and the checkpoint folder (llmpress.provenance.hashes)."""
    import compressed_tensors
    import transformers

    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "llmpress",
        "llmpress_version": __version__,
        "versions": {
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "environment": environment(options.device),
        "source": str(source.path),
        "source_bytes": source.total_bytes,
        "options": options.model_dump(mode="json"),
        "quantized_modules": len(plan.modules),
        "ignored_modules": list(plan.ignored),
        "shard_bytes": shards,
        "inputs": inputs,
        "outputs": outputs,
    }
