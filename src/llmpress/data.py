"""Calibration samples: token sequences chosen deterministically from a text source.

Every document of the source is tokenized and cut into pieces of at most `seq_len` tokens
(the tokenizer's BOS first, where it has one, else an encoder's CLS: models are trained to
see it, and calibrating without it skews the statistics of the first positions, clearly so in
Gemma's family). A document's tail shorter than a window stays a short sample, never padded,
so no pad token enters the statistics. The pieces are shuffled with `seed` and the first
`num_samples` kept. The sha256 of the chosen token ids is the set's fingerprint, recorded in
the output.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmpress.corpora import BUILTIN, DATASET_FORMATS, pydoc_split
from llmpress.errors import LlmpressError, first_line

MIN_SAMPLE_TOKENS = 16  # shorter pieces (a heading, a stray line) carry no useful statistics


@dataclass(frozen=True)
class CalibrationSet:
    samples: list[torch.Tensor]  # 1-D int64 token ids, each at most seq_len long
    source: str
    seq_len: int
    seed: int
    fingerprint: str

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": len(self.samples),
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "seed": self.seed,
            "sha256": self.fingerprint,
        }


def start_token(tokenizer) -> int | None:
    """The token every sample starts with: BOS, or for BERT-style encoders, which have none,
    CLS (their inputs always start with it, and its position's statistics are its own)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return getattr(tokenizer, "cls_token_id", None)


def fingerprint(samples: list[torch.Tensor]) -> str:
    """sha256 over each sample's length and int64 ids, in order."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(len(sample).to_bytes(8, "little"))
        digest.update(sample.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _pydoc_calibration_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in pydoc_split()[1]]


def _rows(table, column: str, tokenizer, source: str) -> list[list[int]]:
    """Token ids per row: the text column, or chat `messages` through the chat template."""
    if column in table.column_names:
        texts = [str(t) for t in table[column] if t]
        return [_encode(tokenizer, t) for t in texts]
    if "messages" in table.column_names:
        if not getattr(tokenizer, "chat_template", None):
            raise LlmpressError(
                f"{source} holds chat `messages` but the tokenizer has no chat template; "
                f"give a {column!r} column instead"
            )
        return [_encode_chat(tokenizer, m) for m in table["messages"] if m]
    raise LlmpressError(
        f"{source} has neither a {column!r} nor a 'messages' column "
        f"(it has {', '.join(table.column_names)})"
    )


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = _encode(tokenizer, rendered)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] == [bos]:
        ids = ids[1:]  # the template wrote the BOS itself; one is added to every sample
    return ids


def _load_table(spec: str, split: str):
    import datasets

    path = Path(spec).expanduser()
    try:
        if path.is_file():
            fmt = DATASET_FORMATS[path.suffix.lower()]
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        return datasets.load_dataset(spec, split=split)
    except Exception as exc:
        raise LlmpressError(
            f"cannot load calibration dataset {spec!r} ({type(exc).__name__}: {first_line(exc)}); "
            "offline, give a local .txt, .jsonl, .json, .csv or .parquet file or "
            f"a built-in text ({', '.join(BUILTIN)})"
        ) from exc


def documents(spec: str, tokenizer, column: str = "text", split: str = "train") -> list[list[int]]:
    """Token ids of each document of the source named by `spec`, in source order."""
    if spec in ("pydoc-calibration", "pydoc"):
        if spec == "pydoc":
            raise LlmpressError(
                "`pydoc` is the evaluation text; calibrate on `pydoc-calibration` so that "
                "evaluation never scores text the algorithm has seen"
            )
        return [_encode(tokenizer, d) for d in _pydoc_calibration_documents()]
    path = Path(spec).expanduser()
    if path.is_dir():
        raise LlmpressError(f"calibration dataset {spec} is a directory; give one file")
    if path.is_file() and path.suffix.lower() not in DATASET_FORMATS:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LlmpressError(f"calibration dataset {spec} is not UTF-8 text: {exc}") from exc
        # A plain text file: paragraphs (blank-line separated) run together into one stream.
        return [_encode(tokenizer, text)]
    if not path.exists() and ("/" not in spec or spec.startswith((".", "/", "~"))):
        raise LlmpressError(
            f"calibration dataset {spec!r} is neither a file, a built-in text "
            f"({', '.join(BUILTIN)}) nor a hub dataset name (owner/name)"
        )
    return _rows(_load_table(spec, split), column, tokenizer, spec)


def calibration_set(
    spec: str,
    tokenizer,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    column: str = "text",
    split: str = "train",
) -> CalibrationSet:
    """`num_samples` token sequences of at most `seq_len` tokens, chosen with `seed`."""
    if num_samples < 1:
        raise LlmpressError(f"--num-samples {num_samples}: ask for at least one sample")
    if seq_len < MIN_SAMPLE_TOKENS:
        raise LlmpressError(f"--seq-len {seq_len}: use at least {MIN_SAMPLE_TOKENS} tokens")
    first = start_token(tokenizer)
    body = seq_len - (first is not None)
    pieces = [
        ids[start : start + body]
        for ids in documents(spec, tokenizer, column, split)
        for start in range(0, len(ids), body)
    ]
    pieces = [p for p in pieces if len(p) >= MIN_SAMPLE_TOKENS]
    if len(pieces) < num_samples:
        raise LlmpressError(
            f"{spec} yields {len(pieces)} samples of up to {seq_len} tokens, not {num_samples}; "
            f"ask for --num-samples {len(pieces)} or fewer, or give more text"
        )
    random.Random(seed).shuffle(pieces)
    prefix = [] if first is None else [first]
    samples = [torch.tensor(prefix + p, dtype=torch.int64) for p in pieces[:num_samples]]
    return CalibrationSet(samples, spec, seq_len, seed, fingerprint(samples))
