"""What the bench scripts share: paths, timing a subprocess tree, summaries, versions.

Imported by scripts run from any of the environments (.venv, .venv-bench, .venv-anchor):
only the standard library and psutil at module level.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_PY = ROOT / ".venv-anchor" / "bin" / "python"
LLMPRESS = ROOT / ".venv-bench" / "bin" / "llmpress"
BENCH_CACHE = ROOT / ".cache" / "bench"
RESULTS_DIR = ROOT / "bench" / "results"
SMOLLM2 = ROOT / ".cache" / "fixtures" / "smollm2-135m"
MB = 1e6


@dataclass
class Run:
    model: str
    scheme: str
    tool: str
    in_mb: float
    wall_s: float | None = None
    cpu_s: float | None = None  # user+sys of the tree: steadier than wall on a shared machine
    peak_rss_mb: float | None = None
    out_mb: float | None = None
    error: str | None = None
    load1: float = 0.0  # 1-min load average before the run: the machine is shared


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def measure(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float, int, int]:
    """Wall time, CPU time, peak RSS (bytes) and exit code of one subprocess tree.

    Peak RSS is the larger of the 50 ms-polled sum over the tree and the kernel's own
    high-water mark for the child (wait4), which catches spikes between polls.
    """
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _tree_rss(ps))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, max(peak, usage.ru_maxrss * 1024), proc.returncode


def last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"Error|Exception|error:", ln)]
    return (errors or lines or ["no output"])[-1][:200]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare_cache(model_dir: Path, cold: bool) -> None:
    """Same page-cache state for every tool: all input cached (default) or none (--cold)."""
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for f in model_dir.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                while fh.read(64 << 20):
                    pass


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per model/scheme/tool: best wall and CPU, worst peak RSS over the repeats."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in runs:
        row = rows.setdefault(
            (r.model, r.scheme, r.tool),
            {
                "model": r.model,
                "scheme": r.scheme,
                "tool": r.tool,
                "in_mb": r.in_mb,
                "wall_s": None,
                "cpu_s": None,
                "peak_rss_mb": None,
                "out_mb": None,
                "error": None,
                "repeats": 0,
            },
        )
        row["repeats"] += 1
        if r.error:
            row["error"] = r.error
            continue
        row["wall_s"] = min(filter(None, (row["wall_s"], r.wall_s)))
        row["cpu_s"] = min(filter(None, (row["cpu_s"], r.cpu_s)))
        row["peak_rss_mb"] = max(filter(None, (row["peak_rss_mb"], r.peak_rss_mb)))
        row["out_mb"] = r.out_mb
    for row in rows.values():
        row["mb_per_s"] = round(row["in_mb"] / row["wall_s"], 1) if row["wall_s"] else None
    return list(rows.values())


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def versions() -> dict[str, str]:
    """This machine, this environment's packages, and .venv-anchor's."""
    out: dict[str, str] = {
        "python": platform.python_version(),
        "cpus": str(os.cpu_count()),
        "mem_gb": f"{psutil.virtual_memory().total / 2**30:.1f}",
    }
    for name in ("llmpress", "torch", "transformers", "compressed-tensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    probe = (
        "from importlib.metadata import version as v; print(' '.join(v(n) for n in "
        "('llmcompressor', 'compressed-tensors', 'transformers', 'torch')))"
    )
    res = subprocess.run([str(ANCHOR_PY), "-c", probe], capture_output=True, text=True)
    if res.returncode == 0:
        names = ("llmcompressor", "compressed-tensors", "transformers", "torch")
        out.update({f"anchor {n}": v for n, v in zip(names, res.stdout.split(), strict=True)})
    return out
