"""Built-in text corpora and text files, for calibration (llmpress.data) and held-out
evaluation (llmpress.evaluate) alike: always the same bytes.

The built-in corpus is Python's own documentation (`pydoc_data.topics`, in every CPython, so
it is there offline). Its topics are split once, by a hash of each topic's name, into an
evaluation part (about a quarter of the bytes) and a calibration part, so that evaluating on
one never scores text the other was calibrated on.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from llmpress.errors import LlmpressError

BUILTIN = {
    "pydoc": "Python's documentation topics (pydoc_data), the evaluation quarter",
    "pydoc-calibration": "Python's documentation topics (pydoc_data), the other three quarters",
}
EVAL_FRACTION = 0.25
# Files read through `datasets` (one row per record, its `text` column); anything else is text.
DATASET_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def pydoc_split() -> tuple[list[str], list[str]]:
    """(evaluation topics, calibration topics): topics in the order of a hash of their names,
    the first ones up to a quarter of all bytes for evaluation. Stable across runs and hosts."""
    from pydoc_data.topics import topics

    ordered = sorted(topics, key=lambda name: (zlib.crc32(name.encode()), name))
    total = sum(len(topics[name]) for name in ordered)
    held_out, taken = [], 0
    for name in ordered:
        if taken >= EVAL_FRACTION * total:
            break
        held_out.append(name)
        taken += len(topics[name])
    rest = [name for name in ordered if name not in set(held_out)]
    return sorted(held_out), sorted(rest)


def _pydoc(part: int) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in pydoc_split()[part])


def _read_dataset_file(path: Path, column: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise LlmpressError(
            f"reading {path.suffix} files needs `datasets`: pip install datasets"
        ) from exc
    table = datasets.load_dataset(
        DATASET_FORMATS[path.suffix.lower()], data_files=str(path), split="train"
    )
    if column not in table.column_names:
        raise LlmpressError(
            f"{path} has no {column!r} column (it has {', '.join(table.column_names)})"
        )
    return "\n\n".join(str(row) for row in table[column] if row)


def load_text(spec: str, column: str = "text") -> str:
    """The text named by `spec`: a built-in corpus name or the path of a file."""
    if spec == "pydoc":
        return _pydoc(0)
    if spec == "pydoc-calibration":
        return _pydoc(1)
    path = Path(spec).expanduser()
    if not path.exists():
        raise LlmpressError(
            f"dataset {spec!r} is neither a file nor a built-in text "
            f"({', '.join(BUILTIN)}); give the path of a .txt, .jsonl, .json, .csv or .parquet file"
        )
    if path.is_dir():
        raise LlmpressError(f"dataset {spec} is a directory; give one text or data file")
    if path.suffix.lower() in DATASET_FORMATS:
        text = _read_dataset_file(path, column)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LlmpressError(f"dataset {spec} is not UTF-8 text: {exc}") from exc
    if not text.strip():
        raise LlmpressError(f"dataset {spec} holds no text")
    return text
