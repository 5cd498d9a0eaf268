"""`llmpress compare`: compress a base model several ways and measure every trade-off.

Each variant is compressed by `llmpress compress` in a child process, so its wall time and
peak memory are a whole process's, as a user's run would see them. Every model is scored on
the same windows; the base's logits are computed once and saved, and each variant is
compared with them, so only one model is in memory at a time. vLLM serving figures come from
child processes too (`serving.py`). The report folder is written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmpress.algorithms import DEFAULT_QUANTIZER
from llmpress.corpora import load_text
from llmpress.errors import LlmpressError
from llmpress.evaluate.checkpoint_eval import (
    SERVING_OUTPUT_TOKENS,
    SERVING_PROMPT_TOKENS,
    EvalReport,
    check_same_tokenizer,
    resolve_device,
    serving_prompts,
)
from llmpress.evaluate.loading import load_model
from llmpress.evaluate.metrics import CachedReference, score
from llmpress.evaluate.report import write_report
from llmpress.evaluate.windows import token_windows
from llmpress.schemes import CALIBRATED, DESCRIPTIONS, preset_args

ALGORITHMS = (DEFAULT_QUANTIZER.name,)  # GPTQ, AWQ... join as they land
SERVING_FIGURES = (
    "TTFT is the median time of one request alone with one output token; TPOT the median of "
    "(time of one request alone with all its output tokens - its TTFT) / (tokens - 1); "
    "throughput is generated tokens / wall time with all prompts submitted together. Times are "
    "wall clock around vLLM's offline `LLM.generate`, greedy, after warm-up."
)


@dataclass(frozen=True)
class Variant:
    scheme: str
    algorithm: str = DEFAULT_QUANTIZER.name

    @property
    def label(self) -> str:
        return (
            self.scheme
            if self.algorithm == DEFAULT_QUANTIZER.name
            else f"{self.scheme}:{self.algorithm}"
        )


def parse_variants(text: str) -> list[Variant]:
    """'W4A16,FP8_DYNAMIC,W4A16:gptq' -> variants; unknown names fail before any work."""
    variants = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        scheme, _, algorithm = item.partition(":")
        scheme, algorithm = scheme.upper(), (algorithm or DEFAULT_QUANTIZER.name).lower()
        if scheme not in DESCRIPTIONS:
            raise LlmpressError(
                f"unknown scheme {scheme!r} in --schemes; choose from {', '.join(DESCRIPTIONS)}"
            )
        if algorithm not in ALGORITHMS:
            raise LlmpressError(
                f"unknown algorithm {algorithm!r} in {item!r}; available: {', '.join(ALGORITHMS)}"
            )
        variant = Variant(scheme, algorithm)
        if variant in variants:
            raise LlmpressError(f"{item!r} is listed twice in --schemes")
        variants.append(variant)
    if not variants:
        raise LlmpressError("--schemes names no scheme; e.g. --schemes W4A16,FP8_DYNAMIC")
    return variants


def _takes_group_size(scheme: str) -> bool:
    weights = preset_args(scheme)["weights"]
    return weights.group_size is not None and weights.type == "int"


def compress_in_child(
    base: Path,
    variant: Variant,
    output: Path,
    group_size: int | None,
    calibration: str = "pydoc-calibration",
) -> dict[str, Any]:
    """Run `llmpress compress` as its own process: wall time, peak RSS, or its error.
    Calibrated schemes (static activation scales) calibrate on `calibration`."""
    command = [
        sys.executable,
        "-m",
        "llmpress.cli",
        "compress",
        str(base),
        "-o",
        str(output),
        "--scheme",
        variant.scheme,
        "--quiet",
    ]
    if group_size is not None and _takes_group_size(variant.scheme):
        command += ["--group-size", str(group_size)]
    if variant.scheme in CALIBRATED:
        command += ["--dataset", calibration]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_WRAPPER, *command], stdout=out, stderr=err
        ).returncode
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    peak = None
    if lines and lines[-1].startswith(_PEAK_MARK):
        peak = int(lines.pop().removeprefix(_PEAK_MARK))
    result = {"seconds": seconds, "peak_rss_bytes": peak, "command": command}
    if code != 0:
        reason = lines[-1] if lines else f"exit status {code}"
        return {**result, "error": reason.removeprefix("error: ")}
    return {**result, "output": stdout.strip()}


# A process's peak RSS (ru_maxrss) starts from the memory of the process it was forked from,
# and this one holds a model. So the compress runs as the child of a small wrapper, which
# reports the child's own peak from wait4 on a last line of stderr.
_PEAK_MARK = "llmpress-peak-rss-bytes "
_PEAK_RSS_WRAPPER = f"""
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\n{_PEAK_MARK}%d\\n" % (usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _machine() -> dict[str, str]:
    import compressed_tensors
    import transformers

    import llmpress

    return {
        "platform": platform.platform(),
        "cpu cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "versions": f"llmpress {llmpress.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, "
        f"compressed-tensors {compressed_tensors.__version__}",
    }


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CompareSettings:
    """How every model is scored and served: the same for the base and each variant."""

    dataset: str = "pydoc"
    seq_len: int = 512
    windows: int | None = 16
    group_size: int | None = None
    calibration: str = "pydoc-calibration"
    serve: bool = False
    dtype: str = "auto"
    device: str = "cpu"
    progress: bool = True


def run_compare(
    base: str | Path,
    schemes: str | list[Variant],
    report_dir: str | Path,
    dataset: str = "pydoc",
    seq_len: int = 512,
    windows: int | None = 16,
    group_size: int | None = None,
    calibration: str = "pydoc-calibration",
    serve: bool | None = None,
    dtype: str = "auto",
    device: str = "auto",
    keep_checkpoints: bool = True,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compress BASE with every variant, evaluate each against it, write the report folder.

    `serve`: measure vLLM serving (None: where vLLM is installed); `calibration`: the text
    calibrated schemes (FP8, W8A8_STATIC, NVFP4) calibrate on, disjoint from `dataset`. Returns results.json's data.
    """
    from llmpress.evaluate.serving import vllm_unavailable_reason

    variants = parse_variants(schemes) if isinstance(schemes, str) else list(schemes)
    report_dir = Path(report_dir)
    base_path = Path(base)
    if report_dir.exists() and not force:
        raise LlmpressError(f"{report_dir} exists; pass --force to replace it")
    if (
        report_dir.resolve() == base_path.resolve()
        or base_path.resolve() in report_dir.resolve().parents
    ):
        raise LlmpressError(f"report folder {report_dir} must not be inside the base model")
    settings = CompareSettings(
        dataset=dataset,
        seq_len=seq_len,
        windows=windows,
        group_size=group_size,
        calibration=calibration,
        serve=vllm_unavailable_reason() is None if serve is None else serve,
        dtype=dtype,
        device=resolve_device(device),
        progress=progress,
    )
    text = load_text(dataset)
    work = report_dir.with_name(f".{report_dir.name}.llmpress-partial")
    shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True)
    try:
        results = _compare_into(work, base_path, variants, text, settings)
        if not keep_checkpoints:
            shutil.rmtree(work / "checkpoints")
        shutil.rmtree(work / "base-logits", ignore_errors=True)
        write_report(results, work)
        if report_dir.exists():
            shutil.rmtree(report_dir)
        work.rename(report_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _log(f"wrote {report_dir / 'report.md'}", progress)
    return results


def _serve(checkpoint: Path, prompts: list[str]) -> dict[str, Any]:
    from llmpress.evaluate.serving import measure_serving

    return measure_serving(checkpoint, prompts, output_tokens=SERVING_OUTPUT_TOKENS).to_json()


def _compare_into(
    work: Path, base_path: Path, variants: list[Variant], text: str, settings: CompareSettings
) -> dict[str, Any]:
    progress, device = settings.progress, settings.device
    steps = len(variants) + 1
    _log(f"[1/{steps}] base {base_path}: loading and scoring", progress)
    start = time.perf_counter()
    base = load_model(base_path, settings.dtype, device)
    load_seconds = time.perf_counter() - start
    chosen = token_windows(base.tokenizer, text, settings.seq_len, settings.windows)
    reference = CachedReference(base.model, work / "base-logits")
    base_quality = score(base.model, chosen, reference, device, progress, label="base")
    base_report = EvalReport.of(
        base, base, settings.dataset, chosen, base_quality, load_seconds, device
    )
    prompts = serving_prompts(base.tokenizer, chosen)
    base_entry: dict[str, Any] = {
        "label": f"base ({str(base.dtype).removeprefix('torch.')})",
        "checkpoint": str(base_path.resolve()),
        "eval": base_report.to_json(),
    }
    # Every window's base logits are saved now: the base's weights can go; its tokenizer and
    # size stay for the checks and ratios.
    reference.model = base.model = None
    gc.collect()
    if settings.serve:
        _log(f"[1/{steps}] base: serving with vLLM", progress)
        base_entry["serving"] = _serve(base_path, prompts)

    entries = []
    for number, variant in enumerate(variants, start=2):
        out = work / "checkpoints" / variant.label.replace(":", "-")
        entry: dict[str, Any] = {
            "label": variant.label,
            "scheme": variant.scheme,
            "algorithm": variant.algorithm,
            "checkpoint": str(out.relative_to(work)),  # inside the report folder
        }
        entries.append(entry)
        _log(f"[{number}/{steps}] {variant.label}: compressing", progress)
        entry["compress"] = compress_in_child(
            base_path, variant, out, settings.group_size, settings.calibration
        )
        if "error" in entry["compress"]:
            entry["error"] = f"compress failed: {entry['compress']['error']}"
            _log(f"  {entry['error']}", progress)
            continue
        _log(f"[{number}/{steps}] {variant.label}: scoring", progress)
        start = time.perf_counter()
        model = load_model(out, base.dtype, device)
        load_seconds = time.perf_counter() - start
        check_same_tokenizer(model, base, text)
        quality = score(model.model, chosen, reference, device, progress, label=variant.label)
        report = EvalReport.of(model, base, settings.dataset, chosen, quality, load_seconds, device)
        entry["eval"] = {**report.to_json(), "checkpoint": entry["checkpoint"]}
        del model
        gc.collect()
        if settings.serve:
            _log(f"[{number}/{steps}] {variant.label}: serving with vLLM", progress)
            entry["serving"] = _serve(out, prompts)
    summary = {
        "dataset": settings.dataset,
        "seq_len": settings.seq_len,
        "windows": chosen.ids.shape[0],
        "tokens_scored": base_quality.tokens,
        "dtype": str(base.dtype).removeprefix("torch."),
        "device": device,
        "group_size": settings.group_size,
        "serving": _serving_settings(base_entry, prompts) if settings.serve else None,
    }
    return {"settings": summary, "base": base_entry, "variants": entries, "machine": _machine()}


def _serving_settings(base_entry: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    measured = base_entry.get("serving") or {}
    return {
        "device": measured.get("device", "cpu"),
        "vllm_version": measured.get("vllm_version"),
        "prompts": len(prompts),
        "prompt_tokens": SERVING_PROMPT_TOKENS,
        "output_tokens": SERVING_OUTPUT_TOKENS,
        "definition": SERVING_FIGURES,
    }
