"""The command line: schemes, compress, inspect — as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import COMPUTE_DTYPE

from llmpress.schemes import scheme_names


def llmpress(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmpress.cli", *map(str, args)], capture_output=True, text=True
    )


def test_schemes_lists_every_preset_one_line_each():
    proc = llmpress("schemes")
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == scheme_names()


def test_compress_then_inspect(tiny_llama, tmp_path):
    out = tmp_path / "w4"
    proc = llmpress(
        "compress", tiny_llama, "-o", out, "--scheme", "W4A16_ASYM", "--observer", "mse", "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    assert "14 layers quantized" in proc.stdout
    # --quiet: the result line only, no progress bar (it once drew its 0% line).
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert "%|" not in proc.stderr, proc.stderr
    for name in (
        "config.json",
        "model.safetensors",
        "recipe.yaml",
        "llmpress.json",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name

    info = json.loads(llmpress("inspect", out, "--json").stdout)
    (group,) = info["groups"].values()
    assert group["format"] == "pack-quantized"
    assert group["weights"] == "int4 group 128 asym (static)"
    assert info["quantized_layers"] == 14 and info["ignore"] == ["lm_head"]
    assert info["layers_by_kind"]["model.layers.*.mlp.down_proj"] == {"int4 packed in int32": 2}
    assert 1.5 < info["compression_ratio"] < 4

    table = llmpress("inspect", out).stdout
    assert "int4 group 128 asym (static)" in table and "ratio" in table
    recipe = (out / "recipe.yaml").read_text()
    assert "QuantizationModifier" in recipe and "observer: mse" in recipe


def test_inspect_rejects_a_plain_model(tiny_llama):
    proc = llmpress("inspect", tiny_llama)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tiny_llama} is not a compressed-tensors checkpoint"


def test_dry_run_prints_the_plan_writes_nothing_and_estimates_close(tiny_llama, tmp_path):
    from llmpress import compress
    from llmpress.api import compress_options
    from llmpress.estimate import dry_run

    out = tmp_path / "never"
    proc = llmpress("compress", tiny_llama, "-o", out, "--scheme", "W4A16", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "W4A16 by rtn (minmax observer): 14 modules" in proc.stdout
    assert "q_proj x 2" in proc.stdout and "left alone: lm_head" in proc.stdout
    plan = dry_run(tiny_llama, compress_options("W4A16"))
    real = compress(str(tiny_llama), str(tmp_path / "real"), "W4A16", progress=False)
    assert real.quantized_modules == plan["quantized_modules"] == 14
    assert abs(plan["estimated_output_bytes"] / real.output_bytes - 1) < 0.03
    assert f"write about {plan['estimated_output_bytes'] / 1e6:,.1f} MB" in proc.stdout


def test_dry_run_fails_fast_on_a_plan_that_cannot_work(smollm2, tmp_path):
    proc = llmpress("compress", smollm2, "-o", tmp_path / "x", "--scheme", "W4A16", "--dry-run")
    assert proc.returncode == 2
    assert "group size 128 does not divide" in proc.stderr and "--group-size 64" in proc.stderr


def test_dry_run_of_a_calibrated_scheme_shows_the_calibration_and_needs_data(
    tokenized_llama, tmp_path
):
    out = tmp_path / "never"
    proc = llmpress("compress", tokenized_llama, "-o", out, "--scheme", "FP8", "--dry-run")
    assert proc.returncode == 2 and "give --dataset" in proc.stderr
    proc = llmpress(
        "compress", tokenized_llama, "-o", out, "--scheme", "FP8", "--dry-run",
        "--dataset", "pydoc-calibration", "--num-samples", "64", "--max-memory", "10MB",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.iterdir())
    assert "FP8 by rtn + static activation scales" in proc.stdout
    # 64 x 512 tokens of 128-wide hidden states in the compute dtype, two generations: 33.6 MB
    # in float32, 16.8 MB in bf16.
    assert "64 samples x 512 tokens at most from pydoc-calibration (seed 0)" in proc.stdout
    megabytes = 34 if COMPUTE_DTYPE.itemsize == 4 else 17
    assert f"activations {megabytes} MB, 10 MB of it in memory" in proc.stdout
