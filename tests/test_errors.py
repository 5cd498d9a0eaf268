"""Bad input gets one clear line that says what to change, and loses nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmpress import compress
from llmpress.errors import LlmpressError


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _no_partial(parent: Path) -> bool:
    return not any(".llmpress-" in p.name for p in parent.iterdir())


def test_unknown_scheme_lists_the_choices(tiny_llama, tmp_path):
    with pytest.raises(
        LlmpressError, match=r"unknown scheme 'W9A16'; choose one of W4A16.*llmpress schemes"
    ):
        compress(tiny_llama, tmp_path / "out", "W9A16")
    assert not (tmp_path / "out").exists()


def test_missing_model_directory(tmp_path):
    with pytest.raises(LlmpressError, match="does not exist"):
        compress(tmp_path / "nope", tmp_path / "out", "W4A16")


def test_directory_without_weights(tiny_llama, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model)
    with pytest.raises(LlmpressError, match="has no .safetensors weights"):
        compress(model, tmp_path / "out", "W4A16")


def test_unreadable_safetensors(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(LlmpressError, match="cannot read safetensors file"):
        compress(model, tmp_path / "out", "W4A16")


def test_group_size_that_does_not_divide_lists_layers_and_fixes(tiny_llama, tmp_path):
    with pytest.raises(LlmpressError) as info:
        compress(tiny_llama, tmp_path / "out", "W4A16", group_size=96)
    message = str(info.value)
    assert "model.layers.*.mlp.down_proj (in_features 512)" in message
    assert "--group-size 128" in message and "--ignore" in message
    assert "\n" not in message


def test_nan_weights_are_refused_and_nothing_is_written(tiny_llama, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmpressError, match=r"model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf"):
        compress(model, tmp_path / "out", "W8A8")
    assert not (tmp_path / "out").exists() and _no_partial(tmp_path)


def test_target_matching_nothing(tiny_llama, tmp_path):
    with pytest.raises(LlmpressError, match=r"target 're:.*nonexistent' matches no Linear layer"):
        compress(tiny_llama, tmp_path / "out", "W4A16", targets=["re:.*nonexistent"])


def test_existing_output_needs_force_and_force_replaces_it(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(LlmpressError, match="exists; pass --force"):
        compress(tiny_llama, out, "W8A16")
    assert (out / "keep.txt").read_text() == "user data"
    compress(tiny_llama, out, "W8A16", force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_output_inside_input_is_refused_and_input_untouched(tiny_llama, tmp_path):
    before = _digest(tiny_llama)
    with pytest.raises(LlmpressError, match="overlaps the input model"):
        compress(tiny_llama, tiny_llama, "W4A16", force=True)
    compress(tiny_llama, tmp_path / "out", "W4A16", progress=False)
    assert _digest(tiny_llama) == before


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: a 900 KiB tmpfs (needs root, as CI and dev machines are)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        pytest.fail(f"cannot mount a tmpfs to test a full disk: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_before_start_is_refused(tiny_llama, small_disk):
    (small_disk / "filler").write_bytes(b"\0" * 900_000)
    with pytest.raises(LlmpressError, match="not enough space for the output"):
        compress(tiny_llama, small_disk / "out", "W8A16")
    assert not (small_disk / "out").exists() and _no_partial(small_disk)


def test_disk_filling_up_midway_leaves_nothing(tiny_llama, small_disk):
    # The estimate (0.82 MB) fits in 0.92 MB, but 16-bit scales for every 16 two-bit weights
    # make the real output 0.96 MB: the disk fills up while shards are written.
    with pytest.raises(LlmpressError, match="no space left on the device"):
        compress(
            tiny_llama,
            small_disk / "out",
            "W2A16",
            group_size=16,
            max_shard_size=200_000,
            progress=False,
        )
    assert not (small_disk / "out").exists() and _no_partial(small_disk)
    assert shutil.disk_usage(small_disk).used < 100_000


def test_cli_prints_one_line_and_exit_code_2(tiny_llama, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmpress.cli",
            "compress",
            str(tiny_llama),
            "-o",
            str(tmp_path / "o"),
            "--scheme",
            "nope",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown scheme 'nope'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_killed_run_leaves_no_output_and_next_run_succeeds(tiny_llama, tmp_path):
    """A run killed mid-way leaves at most a hidden partial directory, which the next run clears."""
    out = tmp_path / "out"
    partial = tmp_path / ".out.llmpress-partial"
    partial.mkdir()
    (partial / "part-00001.safetensors").write_bytes(b"half")
    compress(tiny_llama, out, "W4A16", progress=False)
    assert not partial.exists()
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["format"]
        == "pack-quantized"
    )


def test_cuda_requested_without_gpu(tiny_llama, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the error path cannot be reached")
    with pytest.raises(LlmpressError, match="no CUDA device"):
        compress(tiny_llama, tmp_path / "out", "W4A16", device="cuda")


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach the hub from tests
    with pytest.raises(
        LlmpressError,
        match=r"'some-org/some-model' is not a local directory and could not be fetched",
    ):
        compress("some-org/some-model", tmp_path / "out", "W4A16")
