"""sha256 of the files a run reads and writes, for the manifest (`inputs`, `outputs`).

Hashing reads every byte once more. The inputs are hashed in a background thread while the
layers are compressed (the source is read anyway and sits in the page cache; hashlib
releases the GIL), at the lowest priority, so that they take the CPU time the compression
leaves idle; the outputs when the writer has finished them, the files in parallel. What this
costs is in BENCHMARKS.md (issue 21).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 22  # 4 MiB

# Files beside a checkpoint that describe it rather than belong to it: the manifest holds
# the hashes, the signature signs them; neither is in `outputs`.
SIGNATURE = "model.sig"  # model-signing's default name, which its CLI looks for
PROVENANCE_FILES = ("llmpress.json", SIGNATURE)


def sha256_file(path: Path) -> str:
    """Read into one reused buffer (large updates run without the GIL; no copies pile up)."""
    digest, buffer = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """What the manifest records of one file: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def tree_entries(folder: Path, skip: tuple[str, ...] = PROVENANCE_FILES) -> dict[str, dict]:
    """Every file under `folder` (by path relative to it, sorted), but `skip`'s names at its
    top level and hidden folders (a partial run's resume state); the files are hashed in
    parallel, one per core (shards of a large checkpoint)."""
    files = {n: folder / n for n in checkpoint_files(folder) if n not in skip}
    workers = max(1, min(len(files), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmpress-hash") as pool:
        return dict(zip(files, pool.map(file_entry, files.values()), strict=True))


def checkpoint_files(folder: Path) -> list[str]:
    """The files under `folder`, by path relative to it, sorted; hidden folders (a partial
    run's resume state) left out."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not relative.parts[0].startswith("."):
            found.append(relative.as_posix())
    return found


class BackgroundHashes:
    """Files hashed one after the other in a background thread; `result()` waits for them."""

    def __init__(self, files: dict[str, Path]):
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="llmpress-hash", initializer=_yield_the_cpu
        )
        self._futures: dict[str, Future] = {
            name: self._pool.submit(file_entry, path) for name, path in sorted(files.items())
        }
        self._pool.shutdown(wait=False)

    def result(self) -> dict[str, dict]:
        return {name: future.result() for name, future in self._futures.items()}

    def cancel(self) -> None:
        for future in self._futures.values():
            future.cancel()


def _yield_the_cpu() -> None:
    """Run this thread at the lowest priority (Linux: per thread), so that it hashes on the
    cores the compression leaves idle (reads, writes) instead of slowing it down."""
    with contextlib.suppress(AttributeError, OSError):  # elsewhere: at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
