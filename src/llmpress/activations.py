"""Hidden states of the calibration batches between two decoder layers, in bounded memory.

Each layer turns one generation of hidden states (its inputs) into the next (its outputs).
Entries are kept in memory up to a byte budget (`--max-memory`); beyond it they live only in
files. With a directory, every generation is also written to disk as it is produced, in a
background thread, so that a journal can point at the last complete generation and an
interrupted run can resume from it; the previous generation is kept until the next one is
complete.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from llmpress.source import SAFETENSORS_DTYPES

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


# Batches queued for the disk at most; each holds its tensor until written.
_WRITES_IN_FLIGHT = 2


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ActivationCache:
    """One hidden-state tensor per calibration batch, for the current and the next layer."""

    def __init__(self, directory: Path | None = None, budget: int | None = None):
        self.directory, self.budget = directory, budget
        self.generation = 0  # index of the generation `get` reads
        self._memory: dict[int, torch.Tensor] = {}
        self._next_memory: dict[int, torch.Tensor] = {}
        self._shapes: dict[int, tuple[list[int], str]] = {}
        self._next_shapes: dict[int, tuple[list[int], str]] = {}
        self._writes: list[Future] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmpress-spill")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        if directory is None and budget is not None:
            raise ValueError("an activation budget needs a directory to spill to")

    @classmethod
    def reopen(cls, directory: Path, generation: int, budget: int | None) -> ActivationCache:
        """The cache as a journal left it: generation `generation` complete on disk."""
        cache = cls(directory, budget)
        cache.generation = generation
        meta = json.loads((cache._folder(generation) / "meta.json").read_text())
        cache._shapes = {int(i): (shape, dtype) for i, (shape, dtype) in meta.items()}
        return cache

    def _folder(self, generation: int) -> Path:
        assert self.directory is not None
        return self.directory / f"gen-{generation:05d}"

    def get(self, index: int) -> torch.Tensor:
        if index in self._memory:
            return self._memory[index]
        shape, dtype = self._shapes[index]
        numel = 1
        for dim in shape:
            numel *= dim
        path = self._folder(self.generation) / f"{index:05d}.bin"
        flat = torch.from_file(str(path), shared=False, size=numel, dtype=SAFETENSORS_DTYPES[dtype])
        return flat.reshape(shape)

    def put(self, index: int, tensor: torch.Tensor) -> None:
        """`tensor` becomes entry `index` of the next generation; the current entry `index`
        has been read for the last time."""
        self._memory.pop(index, None)
        tensor = tensor.detach().to("cpu").contiguous()  # host memory: the budget's unit
        held = sum(_nbytes(t) for t in self._next_memory.values())
        if self.budget is None or held + _nbytes(tensor) <= self.budget:
            self._next_memory[index] = tensor
        if self.directory is not None:
            self._next_shapes[index] = (list(tensor.shape), _DTYPE_NAMES[tensor.dtype])
            folder = self._folder(self.generation + 1)
            folder.mkdir(exist_ok=True)
            while len(self._writes) >= _WRITES_IN_FLIGHT:  # a slow disk must not hoard batches
                self._writes.pop(0).result()
            self._writes.append(self._writer.submit(_write, folder / f"{index:05d}.bin", tensor))

    def advance(self) -> int:
        """The next generation becomes current once it is wholly on disk; the one before the
        previous is deleted. Returns the new generation's index, for the journal."""
        for write in self._writes:
            write.result()
        self._writes.clear()
        self.generation += 1
        self._memory, self._next_memory = self._next_memory, {}
        if self.directory is not None:
            self._shapes, self._next_shapes = self._next_shapes, {}
            meta = {str(i): list(v) for i, v in self._shapes.items()}
            (self._folder(self.generation) / "meta.json").write_text(json.dumps(meta))
            stale = self._folder(self.generation - 2)
            if stale.exists():
                shutil.rmtree(stale)
        return self.generation

    def close(self) -> None:
        self._writer.shutdown(wait=True)


def _write(path: Path, tensor: torch.Tensor) -> None:
    with open(path, "wb") as out:
        out.write(memoryview(tensor.cpu().reshape(-1).view(torch.uint8).numpy()))
