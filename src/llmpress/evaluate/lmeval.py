"""Optional lm-evaluation-harness tasks (hellaswag, arc_easy, ...) on an already-loaded model.

lm-eval is an optional extra (`pip install 'llmpress[lmeval]'`) and slow to import, so it is
imported inside `run_tasks`. Every task is built (its data loaded) before the model runs, so a
missing task or data set fails in seconds with a message that says what to do, not after the
first task's evaluation or as a traceback from `datasets`.
"""

from __future__ import annotations

import difflib
import functools
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmpress.errors import LlmpressError, first_line

_INSTALL_HINT = "install it with `pip install 'llmpress[lmeval]'` (or `pip install 'lm-eval[hf]'`)"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: int | None = None,
    include_path: Path | None = None,
    batch_size: int = 1,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's `simple_evaluate` on this in-memory model.

    `tasks` are lm-eval task, group or tag names (or paths to task YAML files); `include_path`
    is a folder of extra task YAMLs, e.g. tasks whose data files are local. `limit` caps the
    documents per task (for quick checks; the numbers are then not comparable to published
    ones). Metric names are lm-eval's, with its default filter suffix `,none` dropped
    (`acc`, `acc_stderr`, `acc_norm`); other filters stay (`exact_match,strict-match`);
    `sample_len` is the number of documents scored.
    lm-eval may give the tokenizer a pad token (the EOS token) if it has none.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise LlmpressError(
            f"lm-eval tasks {', '.join(tasks)} need the lm-evaluation-harness, which is not "
            f"importable here ({err}); {_INSTALL_HINT}, or evaluate with perplexity/KL only."
        ) from err
    if not tasks:
        raise LlmpressError("No lm-eval tasks given; name at least one, e.g. `hellaswag`.")

    manager = _task_manager(None if include_path is None else str(Path(include_path).resolve()))
    for name in tasks:
        if name not in manager.task_index and not Path(name).is_file():
            raise LlmpressError(_unknown_task_message(name, manager.all_tasks, include_path))
    built = [obj for name in tasks for obj in _build_task(manager, name)]

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _caller_rng_kept():  # simple_evaluate seeds random, numpy and torch globally
        out = simple_evaluate(
            model=lm, tasks=built, limit=limit, task_manager=manager, log_samples=False
        )
    return {task: _numeric_metrics(metrics) for task, metrics in out["results"].items()}


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index: ~10 s of YAML parsing, so built once per `include_path`.

    The index is read-only once built (tasks are built fresh from it on every load), so
    sharing it between calls, e.g. when a report evaluates several checkpoints, changes nothing
    but the time taken.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _build_task(manager, name: str) -> list:
    """The Task or Group (or a tag's Tasks) with its data loaded now, so that data which cannot
    be loaded fails before any evaluation, as a message that says what to do."""
    try:
        loaded = manager.load([name])
    except Exception as err:
        if not _is_data_unavailable(err):
            raise
        raise LlmpressError(_data_unavailable_message(name, manager, err)) from err
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    return list(loaded["tasks"].values())


def _is_data_unavailable(err: BaseException) -> bool:
    """True when the error, or one it was raised from, means the data files could not be read.

    `datasets` reports an unreachable or offline hub as ConnectionError (from huggingface_hub's
    OfflineModeIsEnabled) or FileNotFoundError ("not cached"), and missing local files as
    FileNotFoundError; all are OSErrors, as are network errors from requests/httpx.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _data_unavailable_message(name: str, manager, err: BaseException) -> str:
    entry = manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    cause = f"{type(err).__name__}: {first_line(err)}"
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if data_files:
        return (
            f"lm-eval task '{name}' could not read its local data files {data_files} ({cause}). "
            "Fix `dataset_kwargs: {data_files: ...}` in its YAML; relative paths are resolved "
            "from the current directory, not the YAML's, so use absolute paths."
        )
    dataset = cfg.get("dataset_path")
    if dataset and cfg.get("dataset_name"):
        dataset = f"{dataset}, config {cfg['dataset_name']}"
    what = f"dataset '{dataset}'" if dataset else "one of its datasets"
    offline = [var for var in _OFFLINE_VARS if os.environ.get(var, "").strip() not in ("", "0")]
    why = (
        f"{' and '.join(offline)} {'is' if len(offline) == 1 else 'are'} set"
        if offline
        else "the Hugging Face hub could not be reached"
    )
    return (
        f"lm-eval task '{name}' needs {what}, which is not available offline: {why} and the "
        f"data is not in the local datasets cache ({cause}). Run it once where the hub is "
        "reachable (with HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset) to fill the datasets "
        "cache, or pass include_path with a folder holding a task YAML whose data is local "
        "(`dataset_path: json` and `dataset_kwargs: {data_files: /abs/path/data.jsonl}`)."
    )


def _unknown_task_message(name: str, known: list[str], include_path: Path | None) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    suggestion = f"close matches: {', '.join(close)}" if close else "no close match"
    where = f" or in {include_path}" if include_path else ""
    return (
        f"Unknown lm-eval task '{name}' ({suggestion}); it is not among lm-eval's "
        f"{len(known)} tasks, groups and tags{where}. List them with `lm-eval ls tasks`, or "
        "pass include_path with a folder holding your own task YAML."
    )


def _numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "x"}` -> `{"acc": 0.5, ...}`."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", and "N/A" stderrs of metrics lm-eval cannot bootstrap
        metric, _, filter_name = key.partition(",")
        out[metric if filter_name in ("", "none") else key] = float(value)
    return out


@contextmanager
def _caller_rng_kept():
    """Restore Python's, NumPy's and torch's global RNG state after lm-eval reseeds them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
