"""What vLLM's CPU build can run on this machine, asked of vLLM itself.

vLLM ships its CPU kernels in one library per ISA and loads the one this CPU takes; the AVX2
library lacks `cpu_gemm_wna16`, the op its CPUWNA16LinearKernel calls for int4 weights with
unquantized activations (W4A16 and kin), so those checkpoints load but fail at their first
forward. Its CPU attention likewise refuses an fp8 KV cache without AVX-512 or AMX. Tests ask
vLLM what it has here (tests/vllm_check.py, a child process) and expect, per checkpoint,
either figures or llmpress's "not served" with vLLM's reason.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

CHECK = Path(__file__).with_name("vllm_check.py")
WNA16_KERNEL = "cpu_gemm_wna16"


def run_check(*args: str) -> Any:
    """Run tests/vllm_check.py and return its RESULT; its stderr tail on failure."""
    proc = subprocess.run(
        [sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=900
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        pytest.fail(f"vllm_check {args[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(results[-1].removeprefix("RESULT "))


@functools.cache
def vllm_kernels() -> dict[str, Any]:
    """{"ops": {op: present}, "fp8_kv_cache": vLLM's refusal or None}: what makes vLLM's CPU
    build refuse a checkpoint here."""
    return run_check("kernels", WNA16_KERNEL)


def fp8_kv_cache_refusal() -> str | None:
    """vLLM's own message where its CPU attention takes no fp8 KV cache here (it needs
    AVX-512 or AMX), or None."""
    return vllm_kernels()["fp8_kv_cache"]


def needs_wna16(checkpoint: Path) -> bool:
    """Whether vLLM's CPU build runs a layer of `checkpoint` with CPUWNA16LinearKernel: int4
    weights without quantized input activations, in any config group."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups", {})
    return any(
        (weights := group.get("weights"))
        and weights["type"] == "int"
        and weights["num_bits"] == 4
        and not group.get("input_activations")
        for group in groups.values()
    )


def missing_kernel(checkpoint: Path) -> str | None:
    """The vLLM op `checkpoint` needs that this CPU's vLLM kernels lack, or None."""
    if needs_wna16(checkpoint) and not vllm_kernels()["ops"][WNA16_KERNEL]:
        return WNA16_KERNEL
    return None
