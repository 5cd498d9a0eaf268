"""Checkpoint writer: shards as they fill, then index, config and manifest; atomic at the end.

Everything goes into a hidden temporary directory beside OUT and is renamed into place only
when complete, so a crash, a full disk or Ctrl-C never leaves a half-written checkpoint where
a user (or vLLM) would pick it up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmpress.errors import LlmpressError


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class CheckpointWriter:
    """Collects finished tensors into shards of at most `max_shard_size` bytes."""

    def __init__(self, out_dir: Path, max_shard_size: int) -> None:
        self.out_dir = out_dir
        self.tmp_dir = out_dir.parent / f".{out_dir.name}.llmpress-partial"
        self.max_shard_size = max_shard_size
        self._buffer: dict[str, torch.Tensor] = {}
        self._shards: list[tuple[str, list[str]]] = []
        self.bytes_written = 0
        # One shard is serialized in the background while the next layers are quantized.
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmpress-write")
        self._saving: Future | None = None
        if self.tmp_dir.exists():  # left by a run that was killed before it could clean up
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = tensor_bytes(tensors)
        if self._buffer and tensor_bytes(self._buffer) + size > self.max_shard_size:
            self._flush()
        self._buffer.update(tensors)

    def _flush(self) -> None:
        self._wait()
        if not self._buffer:
            return
        name = f"part-{len(self._shards) + 1:05d}.safetensors"
        self.bytes_written += tensor_bytes(self._buffer)
        self._shards.append((name, list(self._buffer)))
        self._saving = self._saver.submit(self._save, self._buffer, self.tmp_dir / name)
        self._buffer = {}

    def _save(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        with _disk_errors(self.tmp_dir):
            save_file(tensors, path, metadata={"format": "pt"})
            # safetensors creates files owner-only; checkpoints are meant to be shared.
            os.chmod(path, 0o644)

    def _wait(self) -> None:
        """Surface the background save's outcome (a full disk raises here)."""
        if self._saving is not None:
            saving, self._saving = self._saving, None
            saving.result()

    def finish(
        self, config: dict, files: list[Path], extra_files: dict[str, str]
    ) -> dict[str, str]:
        """Write the index, config and extra files, then move the directory into place.

        Returns the sha256 of every file written, for the manifest.
        """
        self._flush()
        self._wait()
        self._saver.shutdown()
        with _disk_errors(self.tmp_dir):
            final_names = self._name_shards()
            for src in files:
                shutil.copy2(src, self.tmp_dir / src.name)
            _write_json(self.tmp_dir / "config.json", config)
            for name, text in extra_files.items():
                (self.tmp_dir / name).write_text(text)
        return {name: _sha256(self.tmp_dir / name) for name in final_names}

    def commit(self, manifest: dict, force: bool) -> None:
        with _disk_errors(self.tmp_dir):
            _write_json(self.tmp_dir / "llmpress.json", manifest)
        _fsync_dir(self.tmp_dir)
        if self.out_dir.exists():
            if not force:
                raise LlmpressError(f"{self.out_dir} exists; pass --force to replace it")
            old = self.out_dir.parent / f".{self.out_dir.name}.llmpress-old"
            os.replace(self.out_dir, old)
            os.replace(self.tmp_dir, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp_dir, self.out_dir)
        _fsync_dir(self.out_dir.parent)

    def abort(self) -> None:
        self._saver.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _name_shards(self) -> list[str]:
        """Rename parts to the names transformers expects, and write the index when sharded."""
        if len(self._shards) == 1:
            os.replace(self.tmp_dir / self._shards[0][0], self.tmp_dir / "model.safetensors")
            return ["model.safetensors"]
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        names = []
        for i, (part, keys) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(self.tmp_dir / part, self.tmp_dir / final)
            weight_map.update(dict.fromkeys(keys, final))
            names.append(final)
        index = {
            "metadata": {"total_size": self.bytes_written},
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(self.tmp_dir / "model.safetensors.index.json", index)
        return names


class _disk_errors:
    """Turn a full disk into a one-line error; the caller removes the partial directory."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if _is_disk_full(exc):
            raise LlmpressError(
                f"no space left on the device holding {self.where.parent}; "
                "free space or write the output elsewhere with -o — nothing was kept"
            ) from exc
        return False


def _is_disk_full(exc: BaseException | None) -> bool:
    # safetensors reports I/O failures as its own error type, with the OS message inside.
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return exc is not None and ("No space left on device" in str(exc) or "os error 28" in str(exc))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
