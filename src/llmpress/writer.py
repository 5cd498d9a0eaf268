"""Checkpoint writer: shards as they fill, then index, config and manifest; atomic at the end.

Everything goes into a hidden temporary directory beside OUT and is renamed into place only
when complete, so a crash, a full disk or Ctrl-C never leaves a half-written checkpoint where
a user (or vLLM) would pick it up.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from llmpress.errors import LlmpressError
from llmpress.source import SAFETENSORS_DTYPES


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# torch dtypes -> safetensors dtype names: the reader's table, inverted.
_ST_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Bytes of header per tensor beyond its name: dtype, shape and offsets (generous).
_ENTRY_BYTES = 160


class ShardFile:
    """A safetensors file written as tensors arrive, so no shard is ever held in memory.

    The format puts a JSON header before the data, and the header may be padded with spaces;
    the data region starts at a reserved offset, and the header is written into the reserved
    space when the shard is closed. Readers see an ordinary safetensors file.
    """

    def __init__(
        self, path: Path, header_reserve: int, resume: tuple[dict, int] | None = None
    ) -> None:
        """`resume`: (entries, size) a journal recorded; the file is cut back to them."""
        self.path = path
        self.reserve = -(-header_reserve // 8) * 8  # data starts 8-byte aligned
        self.entries: dict[str, dict] = {}
        self.size = 0
        if resume is None:
            self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        else:
            self.entries, self.size = resume
            self._file = open(path, "r+b")  # noqa: SIM115 - closed in close()
            self._file.truncate(8 + self.reserve + self.size)
        self._file.seek(8 + self.reserve + self.size)
        # Writes run in a background thread (the GIL is released while the kernel copies),
        # overlapping the next layer's quantization; one batch in flight at a time.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmpress-write")
        self._pending: Future | None = None

    def _drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a full disk raises here, inside the caller's error handling

    def _write_all(self, buffers: list) -> None:
        for data in buffers:
            self._file.write(data)

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        # Widest elements first, as safetensors orders them, to keep tensors aligned.
        self._drain()
        buffers = []
        for name, tensor in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            buffers.append(memoryview(data))
            self.entries[name] = {
                "dtype": _ST_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [self.size, self.size + data.nbytes],
            }
            self.size += data.nbytes
        self._pending = self._writer.submit(self._write_all, buffers)

    def write_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], chunks) -> None:
        """One tensor from byte pieces (a large unquantized tensor copied through)."""
        self._drain()
        start = self.size
        for chunk in chunks:
            self._file.write(chunk)
            self.size += len(chunk)
        self.entries[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [start, self.size],
        }

    def sync(self) -> None:
        """Every byte written so far is in the file (for a journal)."""
        self._drain()
        self._file.flush()

    def close(self) -> None:
        try:
            self._drain()
            header = json.dumps(
                {"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")
            )
            encoded = header.encode()
            if len(encoded) > self.reserve:
                raise RuntimeError(f"safetensors header of {len(encoded)} bytes exceeds reserve")
            self._file.seek(0)
            self._file.write(self.reserve.to_bytes(8, "little"))
            self._file.write(encoded.ljust(self.reserve, b" "))
        finally:  # on failure too: an open handle would keep a deleted file's space in use
            self.abandon()
        os.chmod(self.path, 0o644)

    def abandon(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)
        self._file.close()


# Inside the partial directory: the journal and spilled activations of a calibrated run.
RESUME_DIR = ".resume"


def partial_dir(out_dir: Path) -> Path:
    """Where a checkpoint is assembled before it is renamed to `out_dir`."""
    return out_dir.parent / f".{out_dir.name}.llmpress-partial"


class CheckpointWriter:
    """Streams finished tensors into shards of at most `max_shard_size` bytes."""

    def __init__(
        self,
        out_dir: Path,
        max_shard_size: int,
        input_names: list[str],
        resume: dict | None = None,
    ) -> None:
        """`resume`: a journal's record of `state()`; the partial directory is kept and
        writing continues where that state left off."""
        self.out_dir = out_dir
        self.tmp_dir = partial_dir(out_dir)
        self.max_shard_size = max_shard_size
        # Each input tensor becomes at most five outputs (packed, scale, shape, zero point,
        # input scale).
        self.header_reserve = 64 + 5 * sum(len(n) + 16 + _ENTRY_BYTES for n in input_names)
        self._shard: ShardFile | None = None
        self._shards: list[tuple[str, list[str]]] = []
        self.bytes_written = 0
        if resume is not None:
            self._shards = [(name, keys) for name, keys in resume["shards"]]
            self.bytes_written = resume["bytes_written"]
            keep = {name for name, _ in self._shards}
            if resume["open"] is not None:
                name, entries, size = resume["open"]
                self._shard = ShardFile(self.tmp_dir / name, self.header_reserve, (entries, size))
                keep.add(name)
            for stray in self.tmp_dir.glob("part-*.safetensors"):  # begun after the journal
                if stray.name not in keep:
                    stray.unlink()
            return
        if self.tmp_dir.exists():  # left by a run that was killed before it could clean up
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)

    def state(self) -> dict:
        """What a journal needs to continue this writer later; all bytes so far are in files."""
        shard = self._shard
        if shard is not None:
            with _disk_errors(self.tmp_dir):
                shard.sync()
        return {
            "shards": self._shards,
            "open": None if shard is None else [shard.path.name, shard.entries, shard.size],
            "bytes_written": self.bytes_written,
        }

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = tensor_bytes(tensors)
        with _disk_errors(self.tmp_dir):
            self._shard_with_room(size).write(tensors)
        self.bytes_written += size

    def add_chunks(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int, chunks
    ) -> None:
        """One large tensor from byte pieces, never whole in memory."""
        with _disk_errors(self.tmp_dir):
            self._shard_with_room(nbytes).write_chunks(name, dtype, shape, chunks)
        self.bytes_written += nbytes

    def _shard_with_room(self, size: int) -> ShardFile:
        shard = self._shard
        if shard is not None and shard.size and shard.size + size > self.max_shard_size:
            self._close_shard()
        if self._shard is None:
            name = f"part-{len(self._shards) + 1:05d}.safetensors"
            self._shard = ShardFile(self.tmp_dir / name, self.header_reserve)
        return self._shard

    def _close_shard(self) -> None:
        if self._shard is None:
            return
        shard, self._shard = self._shard, None
        with _disk_errors(self.tmp_dir):
            shard.close()
        self._shards.append((shard.path.name, list(shard.entries)))

    def finish(
        self, config: dict, files: list[Path], extra_files: dict[str, str]
    ) -> dict[str, str]:
        """Write the index, config and extra files, then move the directory into place.

        Returns the size of every shard written, for the manifest. (Shards are not hashed
        here: re-reading a large checkpoint to hash it costs as long as quantizing it.)
        """
        self._close_shard()
        shutil.rmtree(self.tmp_dir / RESUME_DIR, ignore_errors=True)
        with _disk_errors(self.tmp_dir):
            final_names = self._name_shards()
            for src in files:
                shutil.copy2(src, self.tmp_dir / src.name)
            _write_json(self.tmp_dir / "config.json", config)
            for name, text in extra_files.items():
                (self.tmp_dir / name).write_text(text)
        return {name: (self.tmp_dir / name).stat().st_size for name in final_names}

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
        if self._shard is not None:
            self._shard.abandon()
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
