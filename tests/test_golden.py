"""Golden bytes: the shards and config.json of a fixed set of runs (tests/golden_runs.py) on a
tiny Llama and a tiny MoE hash to what `tests/golden.json` recorded, and a killed-then-resumed
run to what its uninterrupted run gave. A refactor must leave every hash as it is; a change
that means to change output records new hashes, and says why in its commit:

    LLMPRESS_GOLDEN=record pytest tests/test_golden.py

The runs take one thread and AVX2 code paths in every arithmetic library (golden_runs.ENV), so
the bytes do not depend on which x86 CPU runs them. Hashes are kept per version of torch,
transformers and compressed-tensors: the pinned set (CI's) is recorded; another set is a
failure that says how to record it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from golden_runs import COMMON, DATA, ENV, RUNS, hashes
from test_resume import _kill_midway

GOLDEN = Path(__file__).with_name("golden.json")
TESTS = Path(__file__).parent


def _versions() -> str:
    return " | ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "compressed-tensors"))


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **ENV, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def produced(tokenized_llama, tiny_moe, tmp_path_factory) -> dict[str, dict[str, str]]:
    out = tmp_path_factory.mktemp("golden")
    done = subprocess.run(
        [sys.executable, str(TESTS / "golden_runs.py"), str(tokenized_llama), str(tiny_moe), str(out)],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_run_writes_the_recorded_bytes(produced):
    recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    key = _versions()
    if os.environ.get("LLMPRESS_GOLDEN") == "record":
        recorded[key] = produced
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    assert key in recorded, (
        f"no golden hashes for {key} (recorded: {sorted(recorded)}); record them with "
        "LLMPRESS_GOLDEN=record pytest tests/test_golden.py"
    )
    want = recorded[key]
    assert sorted(produced) == sorted(RUNS)
    changed = {n: sorted(f for f in want[n] if produced[n].get(f) != want[n][f]) for n in want}
    changed = {n: files for n, files in changed.items() if files}
    assert not changed, f"output bytes changed: {changed}"


def test_a_killed_and_resumed_run_writes_the_uninterrupted_bytes(
    tokenized_llama, produced, tmp_path
):
    out = tmp_path / "fp8"
    how = ("--scheme", "FP8", "--compute-dtype", "float32", "--seed", str(DATA["seed"]))
    assert COMMON["max_shard_size"] == 4 * 10**6  # _kill_midway's shards: the golden run's
    record = _kill_midway(tokenized_llama, out, after_layers=6, how=how, env=_env())
    assert record["layers_done"] < 16
    command = [sys.executable, "-m", "llmpress.cli", "compress", str(tokenized_llama), "-o", str(out),
               *how, "--dataset", DATA["dataset"], "--num-samples", str(DATA["num_samples"]),
               "--seq-len", str(DATA["seq_len"]), "--quiet", "--max-shard-size",
               str(COMMON["max_shard_size"]), "--resume"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr[-4000:]
    assert hashes(out) == produced["fp8-static"]
