"""Several algorithms in one run (issue 7): what a sequential multi-algorithm recipe costs
against a single-algorithm run on the same data.

Runs `llmpress compress` (from .venv-bench) on SmolLM2-135M with the same calibration text:

- `gptq`: GPTQ W8A8 on every Linear (one algorithm);
- `awq`: AWQ W4A16 (groups of 32) on every Linear (one algorithm);
- `multi`: examples/awq-attention-gptq-mlp.yaml, AWQ W4A16 on attention and GPTQ W8A8 on the
  MLP, in one calibrated run;
- `independent`: the same recipe with `--independent`: each modifier calibrated on hidden
  states of its own, as one run per modifier would be (one walk over the layers).

Wall time, CPU time and peak RSS cover each whole process; the evaluation (held-out pydoc
text, `llmpress eval` from .venv) adds perplexity and KL against the base. Goal: multi's wall
<= 1.3x each single-algorithm run's. `independent` is measured against the sum of the two
single-algorithm runs it stands for.

    .venv/bin/python bench/bench_recipes.py [--num-samples 32] [--seq-len 512] [--propagate original]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchlib import BENCH_CACHE, LLMPRESS, MB, ROOT, SMOLLM2, measure

EVAL = ROOT / ".venv" / "bin" / "llmpress"
RUNS = {
    "gptq": ["--scheme", "W8A8", "--method", "gptq"],
    "awq": ["--scheme", "W4A16", "--group-size", "32", "--method", "awq"],
    "multi": ["--recipe", str(ROOT / "examples" / "awq-attention-gptq-mlp.yaml")],
    "independent": [
        "--recipe", str(ROOT / "examples" / "awq-attention-gptq-mlp.yaml"), "--independent"
    ],
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--propagate", default="compressed", choices=["compressed", "original"])
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args()
    data = ["--dataset", "pydoc-calibration", "--num-samples", str(args.num_samples),
            "--seq-len", str(args.seq_len), "--propagate", args.propagate, "--quiet"]  # fmt: skip
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    logs = ROOT / "bench" / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = {}
    with tempfile.TemporaryDirectory(dir=BENCH_CACHE) as tmp:
        for name, flags in RUNS.items():
            out = Path(tmp) / name
            cmd = [str(LLMPRESS), "compress", str(SMOLLM2), "-o", str(out), *flags, *data]
            wall, cpu, rss, code = measure(cmd, ROOT, logs / f"recipes-{name}.log")
            if code != 0:
                raise SystemExit(f"{name} failed: see {logs / f'recipes-{name}.log'}")
            row = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss / MB)}
            if args.eval_windows:
                cmd = [str(EVAL), "eval", str(out), "--base", str(SMOLLM2), "--json", "-",
                       "--windows", str(args.eval_windows), "--device", "cpu", "--quiet"]  # fmt: skip
                quality = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                                    check=True).stdout)  # fmt: skip
                row |= {"perplexity": round(quality["perplexity"], 3),
                        "kl": round(quality["kl_divergence"], 4)}  # fmt: skip
            rows[name] = row
            shutil.rmtree(out)
    print(f"SmolLM2-135M, {args.num_samples} x {args.seq_len} pydoc-calibration, propagate "
          f"{args.propagate}\n")  # fmt: skip
    print("| run | wall s | CPU s | peak RSS MB | perplexity | KL |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['wall_s']} | {row['cpu_s']} | {row['peak_rss_mb']} | "
              f"{row.get('perplexity', '-')} | {row.get('kl', '-')} |")  # fmt: skip
    for single in ("gptq", "awq"):
        ratio = rows["multi"]["wall_s"] / rows[single]["wall_s"]
        verdict = "met" if ratio <= 1.3 else "NOT met"
        print(f"multi / {single}: wall {ratio:.2f}x (goal <= 1.3x: {verdict})")
    both = rows["gptq"]["wall_s"] + rows["awq"]["wall_s"]
    print(f"independent / multi: wall {rows['independent']['wall_s'] / rows['multi']['wall_s']:.2f}x;"
          f" independent / (gptq + awq): {rows['independent']['wall_s'] / both:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
