"""`llmpress eval`: one checkpoint scored on held-out windows, against its base where given."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmpress.corpora import load_text
from llmpress.errors import LlmpressError
from llmpress.evaluate.loading import LoadedModel, load_model
from llmpress.evaluate.metrics import Quality, Reference, score
from llmpress.evaluate.windows import Windows, token_windows

DEFAULT_SEQ_LEN = 512
DEFAULT_WINDOWS = 16
_PROBE_CHARS = 20_000  # enough text to tell two tokenizers apart


def resolve_device(device: str) -> str:
    """`auto` is CUDA where present, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmpressError(f"--device {device}: no CUDA device is available here; use cpu")
    if not device.startswith(("cpu", "cuda")):
        raise LlmpressError(f"--device {device!r} is not supported; use auto, cpu or cuda")
    return device


def check_same_tokenizer(model: LoadedModel, base: LoadedModel, text: str) -> None:
    """KL and agreement compare distributions token by token: both must tokenize alike."""
    probe = text[:_PROBE_CHARS]
    ours = model.tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
    theirs = base.tokenizer(probe, add_special_tokens=False, verbose=False)["input_ids"]
    if len(model.tokenizer) != len(base.tokenizer) or ours != theirs:
        raise LlmpressError(
            f"{base.path} and {model.path} use different tokenizers "
            f"({len(base.tokenizer)} vs {len(model.tokenizer)} tokens in the vocabulary); "
            "compare a checkpoint only with the model it was compressed from"
        )
    if model.tokenizer.bos_token_id != base.tokenizer.bos_token_id:
        raise LlmpressError(f"{base.path} and {model.path} disagree on the BOS token")


@dataclass
class EvalReport:
    checkpoint: str
    base: str | None
    dataset: str
    seq_len: int
    windows: int
    windows_available: int
    bos_prepended: bool
    dtype: str
    device: str
    quantization_format: str | None
    size_bytes: int
    base_size_bytes: int | None
    quality: Quality
    load_seconds: float
    serving: dict[str, Any] | None = None
    base_serving: dict[str, Any] | None = None
    tasks: dict[str, dict[str, float]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kv_cache_note: str | None = None  # the checkpoint's KV cache not simulated, and why

    @classmethod
    def of(
        cls,
        model: LoadedModel,
        base: LoadedModel | None,
        dataset: str,
        windows: Windows,
        quality: Quality,
        load_seconds: float,
        device: str,
        **measured: Any,
    ) -> EvalReport:
        """The report of `model` scored on `windows` (against `base`, where given)."""
        return cls(
            checkpoint=str(model.path),
            base=None if base is None else str(base.path),
            dataset=dataset,
            seq_len=windows.ids.shape[1],
            windows=windows.ids.shape[0],
            windows_available=windows.available,
            bos_prepended=windows.bos is not None,
            dtype=str(model.dtype).removeprefix("torch."),
            device=device,
            quantization_format=model.quantization,
            size_bytes=model.size_bytes,
            base_size_bytes=None if base is None else base.size_bytes,
            quality=quality,
            load_seconds=load_seconds,
            kv_cache_note=model.kv_cache_note,
            **measured,
        )

    @property
    def compression_ratio(self) -> float | None:
        return None if not self.base_size_bytes else self.base_size_bytes / self.size_bytes

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        quality = out.pop("quality")
        out.update(
            tokens_scored=quality["tokens"],
            perplexity=self.quality.perplexity,
            nll=quality["nll"],
            base_perplexity=self.quality.base_perplexity,
            kl_divergence=quality["kl_divergence"],
            top1_agreement=quality["top1_agreement"],
            eval_seconds=quality["seconds"],
            compression_ratio=self.compression_ratio,
        )
        return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: EvalReport) -> str:
    """The terminal table: one row per figure, base beside checkpoint where there is one."""
    q = report.quality
    rows = [
        ("perplexity", _fmt(q.perplexity, ".4f"), _fmt(q.base_perplexity, ".4f")),
        ("KL(base || checkpoint), nats/token", _fmt(q.kl_divergence, ".5f"), "0"),
        ("top-1 agreement with base", _fmt(q.top1_agreement, ".4f"), "1"),
        ("size on disk, MB", f"{report.size_bytes / 1e6:.1f}", _mb(report.base_size_bytes)),
        ("compression ratio", _fmt(report.compression_ratio, ".2f") + "x", "1.00x"),
    ]
    if report.serving:
        for key, label in _SERVING_ROWS:
            rows.append((label, _served(report.serving, key), _served(report.base_serving, key)))
    if report.base is None:
        rows = [(name, ours, "") for name, ours, _ in rows[:1] + rows[3:4]]
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{report.checkpoint}",
        f"  {report.dataset}: {report.windows} windows x {report.seq_len} tokens "
        f"({q.tokens} scored), {report.dtype} on {report.device}",
        f"  {'':<{width}}  {'checkpoint':>12}  {'base' if report.base else '':>12}",
    ]
    lines += [f"  {name:<{width}}  {ours:>12}  {theirs:>12}" for name, ours, theirs in rows]
    for task, metrics in (report.tasks or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        lines.append(f"  task {task}: {shown}")
    lines.append(f"  evaluated in {q.seconds:.1f} s (loading {report.load_seconds:.1f} s)")
    if report.kv_cache_note:
        lines.append(f"  note: {report.kv_cache_note}")
    return "\n".join(lines)


_SERVING_ROWS = (
    ("ttft_ms", "vLLM time to first token, ms"),
    ("tpot_ms", "vLLM time per output token, ms"),
    ("throughput_tok_s", "vLLM throughput, tokens/s"),
)


def _served(serving: dict[str, Any] | None, key: str) -> str:
    if not serving:
        return "-"
    if not serving.get("served"):
        return "not served"
    return f"{serving[key]:.1f}"


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


def evaluate_checkpoint(
    checkpoint: str | Path,
    base: str | Path | None = None,
    dataset: str = "pydoc",
    seq_len: int = DEFAULT_SEQ_LEN,
    windows: int | None = DEFAULT_WINDOWS,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
    serve: bool = False,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    task_include_path: Path | None = None,
) -> EvalReport:
    """Perplexity of CHECKPOINT on `dataset`; with `base`, KL and top-1 agreement against it.

    `serve`: also time vLLM serving the checkpoint (and the base). `tasks`: lm-eval tasks.
    """
    device = resolve_device(device)
    text = load_text(dataset)
    start = time.perf_counter()
    base_path = None if base is None else Path(base)
    model = load_model(checkpoint, dtype, device, tokenizer_from=base_path)
    reference = None
    base_model = None
    if base_path is not None:
        base_model = load_model(base_path, model.dtype, device)
        check_same_tokenizer(model, base_model, text)
        reference = Reference(base_model.model)
    load_seconds = time.perf_counter() - start
    chosen = token_windows(model.tokenizer, text, seq_len, windows)
    task_results = None
    if tasks:  # first: a missing task or data set fails in seconds, not after scoring
        from llmpress.evaluate.lmeval import run_tasks

        task_results = run_tasks(
            model.model, model.tokenizer, tasks, limit=task_limit, include_path=task_include_path
        )
    quality = score(model.model, chosen, reference, device, progress)
    serving = base_serving = None
    if serve:
        # vLLM loads its own copies in a child process: free ours first.
        reference = model.model = None
        if base_model is not None:
            base_model.model = None
        serving, base_serving = _serve(model, base_model, chosen)
    return EvalReport.of(
        model,
        base_model,
        dataset,
        chosen,
        quality,
        load_seconds,
        device,
        serving=serving,
        base_serving=base_serving,
        tasks=task_results,
    )


SERVING_PROMPTS = 8
SERVING_PROMPT_TOKENS = 64
SERVING_OUTPUT_TOKENS = 32


def serving_prompts(tokenizer, windows: Windows) -> list[str]:
    """The opening tokens of the first windows, as text: the same prompts for every model."""
    rows = windows.ids[:SERVING_PROMPTS, :SERVING_PROMPT_TOKENS]
    start = 1 if windows.bos is not None else 0
    return [tokenizer.decode(row[start:]) for row in rows]


def _serve(model: LoadedModel, base: LoadedModel | None, windows: Windows):
    from llmpress.evaluate.serving import measure_serving

    prompts = serving_prompts(model.tokenizer, windows)
    ours = measure_serving(model.path, prompts, output_tokens=SERVING_OUTPUT_TOKENS).to_json()
    theirs = None
    if base is not None:
        theirs = measure_serving(base.path, prompts, output_tokens=SERVING_OUTPUT_TOKENS)
        theirs = theirs.to_json()
    return ours, theirs
