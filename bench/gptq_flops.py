"""Achieved FLOP rate of GPTQ's two phases (issue 5), against this machine's own float32
matrix-product rate measured in the same process:

- the Hessian phase, H += xᵀx per batch (llmpress.algorithms.gptq.Hessian.add): counted both as the
  products it really computes (upper-triangle panels) and as the full product 2·T·n² it
  replaces;
- the solve (llmpress.algorithms.gptq.gptq_quantize): the three n x n factorizations (4/3 n³ in all),
  the lazy block updates (r·n·(B + n) for r rows, n columns, block B) and the two output-error
  products of the report (4·r·n²), a formula count, timed per call.

    .venv/bin/python bench/gptq_flops.py [--num-samples 32] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from benchlib import SMOLLM2

import llmpress.algorithms.gptq as gptq
import llmpress.calibrated_layers as calibrate
from llmpress import compress


def matmul_rate(n: int = 2048, repeat: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an n x n x n product in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


class Tally:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.flops = 0.0
        self.full_flops = 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--propagate", default="compressed", choices=["compressed", "original"])
    args = ap.parse_args()

    hessian, solve = Tally(), Tally()
    add, quantize = gptq.Hessian.add, gptq.gptq_quantize

    def timed_add(self, x):
        tokens, n = x.reshape(-1, x.shape[-1]).shape
        start = time.perf_counter()
        add(self, x)
        hessian.seconds += time.perf_counter() - start
        panel = gptq.HESSIAN_PANEL
        hessian.flops += sum(2 * tokens * min(panel, n - s) * (n - s) for s in range(0, n, panel))
        hessian.full_flops += 2 * tokens * n * n

    def timed_quantize(weight, h, qargs, options, *rest, **kwargs):
        start = time.perf_counter()
        result = quantize(weight, h, qargs, options, *rest, **kwargs)
        solve.seconds += time.perf_counter() - start
        r, n = weight.shape
        solve.flops += 4 / 3 * n**3 + r * n * (options.block_size + n) + 4 * r * n * n
        return result

    gptq.Hessian.add = timed_add
    calibrate.gptq_quantize = timed_quantize
    peak = matmul_rate()
    peak16 = matmul_rate(dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        compress(
            str(SMOLLM2),
            str(Path(tmp) / "out"),
            "W4A16",
            group_size=64,
            method="gptq",
            dataset="pydoc-calibration",
            num_samples=args.num_samples,
            seq_len=args.seq_len,
            compute_dtype=args.compute_dtype,
            propagate=args.propagate,
            progress=False,
        )
        wall = time.perf_counter() - start
    peak_after = matmul_rate()
    print(
        f"float32 matmul rate (2048^3, best of 10): {peak:.0f} GFLOP/s before, {peak_after:.0f} after"
        f"; bfloat16: {peak16:.0f} GFLOP/s"
    )
    print(
        f"run: SmolLM2 W4A16 g64 GPTQ, {args.num_samples} x {args.seq_len}, compute "
        f"{args.compute_dtype}, propagate {args.propagate}, wall {wall:.1f} s"
    )
    for name, t in (("Hessian", hessian), ("solve", solve)):
        rate = t.flops / t.seconds / 1e9
        line = f"{name}: {t.seconds:.1f} s, {t.flops / 1e12:.2f} TFLOP, {rate:.0f} GFLOP/s = {rate / peak:.0%} of the matmul rate"
        if t.full_flops:
            full = t.full_flops / t.seconds / 1e9
            line += f"; as the full product it replaces: {full:.0f} GFLOP/s = {full / peak:.0%}"
        print(line)


if __name__ == "__main__":
    main()
