"""`llmpress compare` on SmolLM2: three schemes compressed, scored and served side by side,
written as report.md, results.json and two PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from vllm_here import missing_kernel

SCHEMES = "W4A16,W8A8,NVFP4A16"  # NVFP4A16 has no vLLM CPU kernel: its cells must say so


def llmpress(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmpress.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def report(smollm2, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare") / "report"
    proc = llmpress(
        "compare", smollm2, "--schemes", SCHEMES, "-o", folder, "--group-size", 64,
        "--seq-len", 64, "--windows", 2, "--device", "cpu", "--serve",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return folder, proc


def test_report_files_exist_and_plots_are_images(report):
    folder, _ = report
    assert {p.name for p in folder.iterdir()} == {
        "report.md",
        "results.json",
        "quality_vs_size.png",
        "quality_vs_time.png",
        "checkpoints",
    }
    for name in ("quality_vs_size.png", "quality_vs_time.png"):
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300
    assert not list(folder.parent.glob(".*llmpress-partial"))


def test_results_hold_every_figure_in_a_sensible_order(report):
    folder, _ = report
    results = json.loads((folder / "results.json").read_text())
    base, variants = results["base"], {v["label"]: v for v in results["variants"]}
    assert list(variants) == SCHEMES.split(",")
    assert base["eval"]["kl_divergence"] == pytest.approx(0, abs=1e-9)
    assert base["eval"]["top1_agreement"] == 1
    for label, entry in variants.items():
        ev, comp = entry["eval"], entry["compress"]
        assert ev["tokens_scored"] == 2 * 63, label
        assert ev["kl_divergence"] > 0 and 0 < ev["top1_agreement"] < 1, label
        assert ev["compression_ratio"] > 1.5, label
        assert comp["seconds"] > 0 and 100e6 < comp["peak_rss_bytes"] < 8e9, label
        assert (folder / entry["checkpoint"] / "config.json").is_file(), label
    # 8-bit weights and activations lose less than 4-bit weights do.
    assert variants["W8A8"]["eval"]["kl_divergence"] < variants["W4A16"]["eval"]["kl_divergence"]
    # vLLM's CPU build serves the base and W8A8, W4A16 where its kernels for this CPU have
    # cpu_gemm_wna16 (else a row that names the op), and never NVFP4A16.
    for entry in (base, variants["W4A16"], variants["W8A8"]):
        serving = entry["serving"]
        if (missing := missing_kernel(folder / entry["checkpoint"])) is not None:
            assert not serving["served"] and missing in serving["reason"], serving
            continue
        assert serving["served"], serving
        assert serving["ttft_ms"] > 0 and serving["tpot_ms"] > 0 and serving["throughput_tok_s"] > 0
    nvfp4 = variants["NVFP4A16"]["serving"]
    assert not nvfp4["served"] and nvfp4["reason"]


def test_report_markdown_has_the_table_and_says_what_was_not_served(report):
    folder, proc = report
    text = (folder / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | size MB | ratio | perplexity | KL")
    assert [row.split(" | ")[0].lstrip("| ") for row in rows[1:]] == [
        "base (bfloat16)",
        *SCHEMES.split(","),
    ]
    nvfp4_row = rows[-1].split(" | ")
    assert nvfp4_row[-3:] == ["not served", "not served", "not served |"]
    assert "NVFP4A16: vLLM did not serve it here:" in text
    assert "![quality vs size](quality_vs_size.png)" in text
    assert "report:" in proc.stdout


def test_unknown_scheme_fails_before_any_work(smollm2, tmp_path):
    proc = llmpress("compare", smollm2, "--schemes", "W4A16,W9A9", "-o", tmp_path / "r")
    assert proc.returncode == 2
    assert "unknown scheme 'W9A9'" in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = llmpress("compare", smollm2, "--schemes", "W4A16:magic", "-o", tmp_path / "r")
    assert proc.returncode == 2 and "unknown algorithm 'magic'" in proc.stderr


def test_existing_report_needs_force(smollm2, tmp_path):
    (tmp_path / "r").mkdir()
    proc = llmpress("compare", smollm2, "--schemes", "W8A8", "-o", tmp_path / "r")
    assert proc.returncode == 2 and "pass --force" in proc.stderr


def test_a_variant_that_cannot_compress_is_reported_not_fatal(smollm2, tmp_path):
    # W4A16's group of 128 does not divide SmolLM2's width (576): that row says why.
    folder = tmp_path / "r"
    proc = llmpress(
        "compare", smollm2, "--schemes", "W4A16,W8A8", "-o", folder, "--seq-len", 32,
        "--windows", 1, "--device", "cpu", "--no-serve",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((folder / "results.json").read_text())
    failed, done = results["variants"]
    assert "group size 128 does not divide" in failed["error"] and "eval" not in failed
    assert done["eval"]["kl_divergence"] > 0
    assert "| W4A16 | failed: compress failed: " in (folder / "report.md").read_text()


def test_calibrated_variants_calibrate_on_text_disjoint_from_the_evaluation(
    tokenized_llama, tmp_path
):
    from llmpress.evaluate.compare import Variant, compress_in_child

    result = compress_in_child(tokenized_llama, Variant("FP8"), tmp_path / "fp8", None)
    assert "error" not in result, result.get("error")
    command = result["command"]
    assert command[command.index("--dataset") + 1] == "pydoc-calibration"
    manifest = json.loads((tmp_path / "fp8" / "llmpress.json").read_text())
    assert manifest["calibration"]["source"].startswith("pydoc-calibration")
