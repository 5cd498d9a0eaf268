"""The allocator policy of llmpress.memory, measured in fresh processes (glibc's settings are
per process): batch-sized blocks are reused without page faults while a layer runs, and what
a layer freed goes back to the OS at its end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmpress.memory import release_large_blocks_to_os

SCRIPT = r"""
import ctypes, ctypes.util, json, resource, sys, torch
from llmpress.memory import release_large_blocks_to_os, return_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024

if sys.argv[1] == "tuned":
    tuned = release_large_blocks_to_os()
else:  # session 3's policy: every block over 1 MiB in a mapping of its own
    tuned = not ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 1 << 20)
block = 4 << 20  # a batch's activation
torch.empty(block // 4).fill_(1.0)  # the first one starts torch's threads
before = faults()
for _ in range(100):  # one batch after another: the same size allocated, filled, freed
    torch.empty(block // 4).fill_(1.0)
reuse_faults = faults() - before

held = [torch.empty(block // 4).fill_(1.0) for _ in range(50)]  # a layer's working set
with_held = rss()
del held
after_free = rss()
return_freed_memory()
print(json.dumps({"tuned": tuned, "reuse_faults": reuse_faults, "held": with_held,
                  "after_free": after_free, "after_return": rss()}))
"""


def _run(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not release_large_blocks_to_os(), reason="glibc's mallopt: Linux only")
def test_batch_sized_blocks_are_reused_and_returned_at_the_end():
    tuned = _run("tuned")
    assert tuned["tuned"]
    pages = (4 << 20) // 4096
    # 100 allocations of 4 MiB: a fresh mapping each would fault 100 x 1024 pages.
    assert tuned["reuse_faults"] < 10 * pages, tuned
    # Freed blocks stay in the heap while the layer runs (no fault to get them back) ...
    working_set = 50 * (4 << 20)
    assert tuned["after_free"] > tuned["held"] - 0.2 * working_set, tuned
    # ... and go back to the OS when it ends.
    assert tuned["after_return"] < tuned["held"] - 0.8 * working_set, tuned


@pytest.mark.skipif(not release_large_blocks_to_os(), reason="glibc's mallopt: Linux only")
def test_one_mapping_per_block_faults_every_time():
    """The measurement above can fail: with every block over 1 MiB in a mapping of its own
    (the policy before), each batch's block is a fresh mapping, zero-filled on first touch."""
    mapped = _run("one-mib")
    assert not mapped["tuned"]
    assert mapped["reuse_faults"] > 90 * (4 << 20) // 4096, mapped
