"""The runs whose output bytes the golden test pins (tests/test_golden.py): every `--method`,
every pruner, static FP8, the KV cache, a mixed recipe and `--independent`, on a tiny Llama
and a tiny MoE. Run as a script, in a process of its own (`ENV`), it prints their hashes.

    python tests/golden_runs.py LLAMA MOE OUT
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

# One thread and AVX2 code paths in every library that does arithmetic (ATen's kernels, MKL's
# GEMMs, oneDNN's), float32 compute: the same bytes on every x86 CPU this project runs on.
ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
DATA = dict(dataset="pydoc-calibration", num_samples=16, seq_len=64, seed=0)
COMMON = dict(progress=False, compute_dtype="float32", max_shard_size=4 * 10**6)

# name: (model, scheme, options)
RUNS: dict[str, tuple[str, str | None, dict]] = {
    "rtn-w4a16": ("llama", "W4A16", dict(group_size=64)),
    "rtn-w4a16-asym": ("llama", "W4A16_ASYM", dict(group_size=64, observer="mse")),
    "rtn-fp8-dynamic": ("llama", "FP8_DYNAMIC", {}),
    "rtn-nvfp4": ("llama", "NVFP4", DATA),
    "gptq-w4a16": ("llama", "W4A16", dict(method="gptq", group_size=64, **DATA)),
    "gptq-w8a8-sequential": ("llama", "W8A8", dict(method="gptq", propagate="sequential", **DATA)),
    "awq-w4a16": ("llama", "W4A16", dict(method="awq", group_size=64, **DATA)),
    "awq-w4a16-clip": ("llama", "W4A16_ASYM", dict(method="awq", group_size=64, awq_clip=True, **DATA)),
    "smoothquant-w8a8": ("llama", "W8A8", dict(method="smoothquant", **DATA)),
    "smoothquant+gptq-w8a8": ("llama", "W8A8", dict(method="smoothquant+gptq", **DATA)),
    "fp8-static": ("llama", "FP8", DATA),
    "fp8-kv-head": ("llama", "FP8_DYNAMIC", dict(kv_cache="fp8-head", **DATA)),
    "fp8-static-original": ("llama", "FP8", dict(propagate="original", kv_cache="fp8", **DATA)),
    "sparsegpt-2of4-fp8": ("llama", "FP8_DYNAMIC", dict(method="sparsegpt", mask="2:4", **DATA)),
    "sparsegpt-only": ("llama", None, dict(method="sparsegpt", sparsity=0.5, **DATA)),
    "sparsegpt+gptq-w4a16": ("llama", "W4A16", dict(method="sparsegpt+gptq", mask="2:4", group_size=64, **DATA)),
    "wanda-w8a8": ("llama", "W8A8", dict(method="wanda", sparsity=0.4, **DATA)),
    "magnitude-2of4": ("llama", None, dict(method="magnitude", mask="2:4")),
    "magnitude-gptq": ("llama", "W4A16", dict(method="magnitude+gptq", group_size=64, **DATA)),
    "mixed-recipe": ("llama", None, dict(recipe=EXAMPLES / "smoothquant-gptq-w8a8.yaml", **DATA)),
    "mixed-groups": ("llama", None, dict(recipe=EXAMPLES / "int8-down-proj-int4-elsewhere.yaml", **DATA)),
    "independent": ("llama", None, dict(recipe=EXAMPLES / "awq-attention-gptq-mlp.yaml", independent=True, **DATA)),
    "moe-rtn": ("moe", "W4A16", dict(group_size=64)),
    "moe-gptq": ("moe", "W4A16", dict(method="gptq", group_size=64, **DATA)),
    "moe-awq": ("moe", "W4A16", dict(method="awq", group_size=64, **DATA)),
    "moe-fp8-kv": ("moe", "FP8", dict(kv_cache="fp8", **DATA)),
}  # fmt: skip


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of a checkpoint's shards and config.json (the manifest holds timings)."""
    files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def main(llama: str, moe: str, out: str) -> None:
    from llmpress import compress  # after ENV is in place (the caller sets it)

    models = {"llama": llama, "moe": moe}
    found = {}
    for name, (model, scheme, options) in RUNS.items():
        folder = Path(out) / name
        compress(models[model], str(folder), scheme, **COMMON, **options)
        found[name] = hashes(folder)
    print(json.dumps(found))


if __name__ == "__main__":
    main(*sys.argv[1:4])
