"""llmpress against an earlier llmpress, side by side: the same commands from two source trees
in one run, alternating, so that a refactor's "no slowdown" is a ratio measured on one machine
in one sitting, not a comparison with figures of another day.

    git worktree add /tmp/base COMMIT
    .venv/bin/python bench/bench_commits.py --base /tmp/base [--head /tmp/head] --repeat 2

Cases: data-free W4A16 and FP8_DYNAMIC on the 1B random Llama (bench_datafree's), GPTQ W4A16
g64 on SmolLM2 (128 x 512 of pydoc-calibration unless --num-samples/--seq-len say). Both trees
run in this interpreter's environment (PYTHONPATH picks the tree). Prints wall time, peak RSS
and the ratio of medians; outputs of the two trees are compared byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_datafree import MODELS
from benchlib import MB, SMOLLM2, measure

ROOT = Path(__file__).resolve().parents[1]


def cases(samples: int, seq_len: int) -> dict[str, list[str]]:
    data = ["--dataset", "pydoc-calibration", "--num-samples", str(samples)]
    data += ["--seq-len", str(seq_len)]
    return {
        "1B W4A16 data-free": [str(MODELS["llama1b"]), "--scheme", "W4A16"],
        "1B FP8_DYNAMIC data-free": [str(MODELS["llama1b"]), "--scheme", "FP8_DYNAMIC"],
        "SmolLM2 GPTQ W4A16 g64": [str(SMOLLM2), "--scheme", "W4A16", "--group-size", "64",
                                   "--method", "gptq", *data],
    }  # fmt: skip


def run(tree: Path, args: list[str], out: Path, log: Path) -> tuple[float, int]:
    env_path = str(tree / "src")
    command = [sys.executable, "-c", "from llmpress.cli import run; run()", "compress", *args,
               "-o", str(out), "--quiet", "--force"]  # fmt: skip
    os.environ["PYTHONPATH"] = env_path
    try:
        wall, _cpu, peak, code = measure(command, ROOT, log)
    finally:
        del os.environ["PYTHONPATH"]
    if code != 0:
        raise SystemExit(f"{tree}: {' '.join(args)} failed; see {log}")
    return wall, peak


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.safetensors")) + ["config.json"]
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the earlier tree (a worktree)")
    ap.add_argument("--head", type=Path, default=ROOT, help="the later tree (default: this)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", default="", help="cases whose name contains this")
    args = ap.parse_args()
    # In a child: the children measured below would inherit this process's peak RSS (Linux
    # carries ru_maxrss across fork and exec), and building the model peaks at ~3 GB.
    subprocess.run(
        [sys.executable, "-c", "from bench_datafree import MODELS, build_llama1b; "
         "build_llama1b(MODELS['llama1b'])"],
        cwd=Path(__file__).parent, check=True,
    )  # fmt: skip
    trees = {"base": args.base.resolve(), "head": args.head.resolve()}
    work = Path(tempfile.mkdtemp(prefix="bench-commits-"))
    print(f"base {trees['base']}  head {trees['head']}  repeat {args.repeat}")
    try:
        for name, command in cases(args.num_samples, args.seq_len).items():
            if args.only not in name:
                continue
            walls = {t: [] for t in trees}
            peaks = {t: [] for t in trees}
            for i in range(args.repeat):
                order = list(trees) if i % 2 == 0 else list(reversed(trees))
                for tag in order:
                    out = work / tag
                    wall, peak = run(trees[tag], command, out, work / f"{tag}.log")
                    walls[tag].append(wall)
                    peaks[tag].append(peak)
            identical = same_bytes(work / "base", work / "head")
            base, head = statistics.median(walls["base"]), statistics.median(walls["head"])
            print(
                f"{name:28s} wall base {base:7.1f} s head {head:7.1f} s ratio {head / base:5.3f}"
                f" | peak base {max(peaks['base']) / MB:7.0f} MB head "
                f"{max(peaks['head']) / MB:7.0f} MB | same bytes: {identical}",
                flush=True,
            )
            for tag in trees:
                shutil.rmtree(work / tag, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
