"""Interrupted calibrated runs: the journal, `--resume`, and spilled activations.

A run is killed (SIGKILL, nothing to clean up) midway through the layers; resuming it must
give the same bytes as a run that was never interrupted, with several shards so the cut falls
inside one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmpress import compress
from llmpress.errors import LlmpressError
from llmpress.writer import RESUME_DIR, partial_dir

ARGS = dict(dataset="pydoc-calibration", num_samples=16, seq_len=64, seed=0)
SHARD = 4 * 10**6
LAYERS = 16


def _fp8(model, out, **extra):
    """The one command every run here shares (several shards, so a cut falls inside one)."""
    return compress(str(model), str(out), "FP8", progress=False, max_shard_size=SHARD, **extra)


@pytest.fixture(scope="module")
def uninterrupted(tokenized_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "fp8"
    _fp8(tokenized_llama, out, **ARGS)
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _kill_midway(
    tokenized_llama, out, after_layers: int, how=("--scheme", "FP8"), env: dict | None = None
) -> dict:
    """Start the CLI, SIGKILL it once the journal lists `after_layers` finished layers (`env`:
    the child's environment, default this one's with as many threads)."""
    command = [
        sys.executable, "-m", "llmpress.cli", "compress", str(tokenized_llama), "-o", str(out),
        *how, "--dataset", ARGS["dataset"], "--num-samples",
        str(ARGS["num_samples"]), "--seq-len", str(ARGS["seq_len"]), "--quiet",
        "--max-shard-size", str(SHARD),
    ]  # fmt: skip
    journal = partial_dir(out) / RESUME_DIR / "journal.json"
    # As many torch threads as this process: sums of products (GPTQ, AWQ) round by the order
    # their threads add them in, and the uninterrupted run here is compared byte for byte.
    if env is None:
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    record = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            try:
                record = json.loads(journal.read_text())
            except (OSError, ValueError):
                record = None
            if record and record["layers_done"] >= after_layers:
                os.kill(child.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    return record


def test_killed_then_resumed_equals_uninterrupted(tokenized_llama, uninterrupted, tmp_path):
    out = tmp_path / "fp8"
    record = _kill_midway(tokenized_llama, out, after_layers=4)
    assert 4 <= record["layers_done"] < LAYERS
    assert not out.exists() and partial_dir(out).exists()

    # Running the same command again without --resume would silently throw the work away.
    with pytest.raises(LlmpressError, match="--resume to continue"):
        _fp8(tokenized_llama, out, **ARGS)
    # Other settings cannot continue this output.
    with pytest.raises(LlmpressError, match="other settings .*options"):
        _fp8(tokenized_llama, out, resume=True, observer="mse", **ARGS)

    _fp8(tokenized_llama, out, resume=True, **ARGS)
    assert _files(out) == _files(uninterrupted)
    assert len(list(out.glob("*.safetensors"))) > 2
    assert not partial_dir(out).exists()


def test_activations_spilled_to_disk_give_the_same_bytes(tokenized_llama, uninterrupted, tmp_path):
    _fp8(tokenized_llama, tmp_path / "fp8", max_memory=0, **ARGS)
    assert _files(tmp_path / "fp8") == _files(uninterrupted)


def test_resume_without_an_interrupted_run_runs_normally(tokenized_llama, uninterrupted, tmp_path):
    _fp8(tokenized_llama, tmp_path / "fp8", resume=True, **ARGS)
    assert _files(tmp_path / "fp8") == _files(uninterrupted)


AWQ_GPTQ = Path(__file__).resolve().parents[1] / "examples" / "awq-attention-gptq-mlp.yaml"


def test_an_independent_run_resumes_every_stage(tokenized_llama, tmp_path):
    """--independent keeps hidden states per modifier: all of them are journaled and reopened,
    and the resumed run writes the bytes of an uninterrupted one."""
    how = ("--recipe", str(AWQ_GPTQ), "--independent")
    whole = compress(str(tokenized_llama), str(tmp_path / "whole"), recipe=AWQ_GPTQ,
                     independent=True, progress=False, max_shard_size=SHARD, **ARGS).output  # fmt: skip
    out = tmp_path / "cut"
    record = _kill_midway(tokenized_llama, out, after_layers=4, how=how)
    assert 4 <= record["layers_done"] < LAYERS
    # The journal as the killed run left it (it may have gone on after `record` was read).
    left = json.loads((partial_dir(out) / RESUME_DIR / "journal.json").read_text())
    stages = partial_dir(out) / RESUME_DIR / "activations"
    assert (stages / "stage-1" / f"gen-{left['generation']:05d}" / "meta.json").exists()
    compress(str(tokenized_llama), str(out), recipe=AWQ_GPTQ, independent=True, resume=True,
             progress=False, max_shard_size=SHARD, **ARGS)  # fmt: skip
    got, want = _files(out), _files(whole)
    del got["llmpress.json"], want["llmpress.json"]  # GPTQ's timings differ
    assert got == want


def test_a_pruning_run_resumes_to_the_same_bytes(tokenized_llama, tmp_path):
    """SparseGPT 2:4 + FP8, killed midway and resumed: the same tensors as a whole run, and
    the manifest's sparsity (journaled per layer) complete and equal."""
    pruning = dict(method="sparsegpt", mask="2:4")
    whole = tmp_path / "whole"
    compress(str(tokenized_llama), str(whole), "FP8_DYNAMIC", progress=False,
             max_shard_size=SHARD, **pruning, **ARGS)  # fmt: skip
    out = tmp_path / "cut"
    how = ("--scheme", "FP8_DYNAMIC", "--method", "sparsegpt", "--mask", "2:4")
    record = _kill_midway(tokenized_llama, out, after_layers=4, how=how)
    assert 4 <= record["layers_done"] < LAYERS
    compress(str(tokenized_llama), str(out), "FP8_DYNAMIC", progress=False, resume=True,
             max_shard_size=SHARD, **pruning, **ARGS)  # fmt: skip
    cut, full = _files(out), _files(whole)
    manifests = [json.loads(files.pop("llmpress.json")) for files in (cut, full)]
    assert cut == full  # the manifest's GPTQ report holds timings, the rest is the same
    assert manifests[0]["sparsity"] == manifests[1]["sparsity"]
    assert len(manifests[0]["sparsity"]["modules"]) == 7 * LAYERS
