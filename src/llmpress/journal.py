"""The journal of a calibrated run: how far it got, so `--resume` can continue from there.

After each finished group of tensors (a decoder layer, or a loose tensor) the run records how
many groups are done, which generation of hidden states feeds the next layer, and the
writer's state (closed shards, and the bytes of the open one). A resumed run truncates the
open shard to that size, reopens the hidden states, and continues with the next group, so
its output is byte-identical to an uninterrupted run. The journal is replaced atomically
(write, then rename); it survives a killed process, not a power cut.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmpress.errors import LlmpressError

JOURNAL_VERSION = 1


class Journal:
    def __init__(self, directory: Path, run: dict):
        """`run`: what identifies the run (options, source, calibration fingerprint); a
        resumed run must match it exactly."""
        self.directory, self.run = directory, run
        self.path = directory / "journal.json"

    def load(self) -> dict | None:
        """The last record of an interrupted run in this directory, or None."""
        if not self.path.exists():
            return None
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("version") == JOURNAL_VERSION else None

    def check_same_run(self, record: dict) -> None:
        before = record["run"]
        differ = sorted(k for k in set(before) | set(self.run) if before.get(k) != self.run.get(k))
        if differ:
            raise LlmpressError(
                f"the interrupted run used other settings ({', '.join(differ)} differ); run "
                "with the same options to resume it, or pass --force to start over"
            )

    def record(
        self,
        groups_done: int,
        layers_done: int,
        generation: int,
        writer: dict,
        report: dict | None = None,
    ) -> None:
        """`report`: per-module results of the layers done (GPTQ's), kept for the manifest."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {
            "version": JOURNAL_VERSION,
            "run": self.run,
            "groups_done": groups_done,
            "layers_done": layers_done,
            "generation": generation,
            "writer": writer,
            "report": report or {},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.path)
