"""`llmpress eval`: perplexity as a plain computation gives it, KL and agreement that mean what
they say, and clear errors for inputs that cannot be evaluated. Real model (SmolLM2), real text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import bpe_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmpress.corpora import load_text, pydoc_split
from llmpress.errors import LlmpressError
from llmpress.evaluate.checkpoint_eval import evaluate_checkpoint
from llmpress.evaluate.windows import token_windows

SEQ, WINDOWS = 96, 3  # small: each test scores a few hundred tokens on 2 cores


def test_windows_are_fixed_and_start_with_bos(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = load_text("pydoc")
    first = token_windows(tokenizer, text, SEQ, WINDOWS)
    again = token_windows(tokenizer, text, SEQ, WINDOWS)
    assert torch.equal(first.ids, again.ids)
    assert first.ids.shape == (WINDOWS, SEQ)
    assert (first.ids[:, 0] == tokenizer.bos_token_id).all()
    body = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert first.ids[:, 1:].reshape(-1).tolist() == body[: WINDOWS * (SEQ - 1)]


def test_pydoc_evaluation_and_calibration_parts_are_disjoint():
    held_out, calibration = pydoc_split()
    assert held_out and calibration and not set(held_out) & set(calibration)
    eval_text, calib_text = load_text("pydoc"), load_text("pydoc-calibration")
    assert 0.15 < len(eval_text) / (len(eval_text) + len(calib_text)) < 0.35


def test_perplexity_equals_a_plain_computation(smollm2):
    report = evaluate_checkpoint(smollm2, seq_len=SEQ, windows=WINDOWS, device="cpu")
    # The reference: transformers' own shifted cross-entropy, window by window.
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer(load_text("pydoc"), add_special_tokens=False, verbose=False)["input_ids"]
    losses = []
    with torch.no_grad():
        for i in range(WINDOWS):
            window = [tokenizer.bos_token_id, *ids[i * (SEQ - 1) : (i + 1) * (SEQ - 1)]]
            row = torch.tensor([window])
            losses.append(float(model(row, labels=row).loss))
    reference = math.exp(sum(losses) / len(losses))
    assert report.quality.tokens == WINDOWS * (SEQ - 1)
    assert report.quality.perplexity == pytest.approx(reference, rel=1e-4)
    assert report.base is None and report.quality.kl_divergence is None


def test_a_model_against_itself_has_zero_kl_and_full_agreement(smollm2):
    report = evaluate_checkpoint(smollm2, base=smollm2, seq_len=SEQ, windows=2, device="cpu")
    assert report.quality.kl_divergence == pytest.approx(0.0, abs=1e-9)
    assert report.quality.top1_agreement == 1.0
    assert report.quality.base_perplexity == pytest.approx(report.quality.perplexity)
    assert report.compression_ratio == 1.0


def _perturbed(smollm2, folder, scale: float):
    """SmolLM2 with Gaussian noise of `scale` x each projection's std added to its weights."""
    shutil.copytree(smollm2, folder)
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std() * scale
            tensors[name] = (tensor.float() + noise).to(tensor.dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_known_perturbation_raises_kl_with_its_size(smollm2, tmp_path):
    kls, agreements = [], []
    for scale in (0.05, 0.3):
        noisy = _perturbed(smollm2, tmp_path / f"noise-{scale}", scale)
        report = evaluate_checkpoint(noisy, base=smollm2, seq_len=SEQ, windows=2, device="cpu")
        kls.append(report.quality.kl_divergence)
        agreements.append(report.quality.top1_agreement)
    assert 0 < kls[0] < kls[1]
    assert agreements[0] > agreements[1] and agreements[0] < 1


def test_compressed_checkpoint_scores_close_to_its_base(smollm2, tmp_path):
    from llmpress import compress

    out = tmp_path / "w8a8"
    compress(str(smollm2), str(out), "W8A8", progress=False)
    report = evaluate_checkpoint(out, base=smollm2, seq_len=SEQ, windows=2, device="cpu")
    q = report.quality
    assert report.quantization_format == "int-quantized"
    assert 0 < q.kl_divergence < 0.2 and q.top1_agreement > 0.75
    assert abs(q.perplexity / q.base_perplexity - 1) < 0.15
    assert 1.5 < report.compression_ratio < 1.8


# --- bad input ---------------------------------------------------------------------------


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(LlmpressError, match="not a model: it has no config.json"):
        evaluate_checkpoint(tmp_path, seq_len=SEQ, windows=1, device="cpu")
    with pytest.raises(LlmpressError, match="is a file"):
        evaluate_checkpoint(tmp_path / "notes.txt", seq_len=SEQ, windows=1, device="cpu")


def test_a_config_without_weights_is_refused(smollm2, tmp_path):
    shutil.copy(smollm2 / "config.json", tmp_path / "config.json")
    with pytest.raises(LlmpressError, match="holds no .safetensors"):
        evaluate_checkpoint(tmp_path, seq_len=SEQ, windows=1, device="cpu")


def _model_with_own_tokenizer(folder) -> None:
    """A tiny Llama with a 400-token BPE vocabulary trained on the calibration text."""
    from transformers import LlamaConfig

    tokenizer = bpe_tokenizer(400)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        bos_token_id=1,
        eos_token_id=2,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_base_with_another_tokenizer_is_refused(smollm2, tmp_path):
    _model_with_own_tokenizer(tmp_path / "other")
    with pytest.raises(LlmpressError, match="different tokenizers"):
        evaluate_checkpoint(tmp_path / "other", base=smollm2, seq_len=SEQ, windows=1, device="cpu")


def test_text_shorter_than_one_window_is_refused(smollm2, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    with pytest.raises(LlmpressError, match="shorter than one window"):
        evaluate_checkpoint(smollm2, dataset=str(short), seq_len=SEQ, windows=1, device="cpu")
    with pytest.raises(LlmpressError, match="holds 1 windows"):
        long_enough = tmp_path / "one.txt"
        long_enough.write_text(load_text("pydoc")[:800])
        evaluate_checkpoint(smollm2, dataset=str(long_enough), seq_len=SEQ, windows=5, device="cpu")


def test_unknown_dataset_is_refused(smollm2):
    with pytest.raises(LlmpressError, match="neither a file nor a built-in text"):
        evaluate_checkpoint(smollm2, dataset="wikitext-nope", seq_len=SEQ, device="cpu")


def test_jsonl_text_column_is_read_through_datasets(tmp_path):
    rows = [{"text": f"Sentence number {i} of a small file."} for i in range(5)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_text(str(data)) == "\n\n".join(r["text"] for r in rows)
    with pytest.raises(LlmpressError, match="no 'body' column"):
        load_text(str(data), column="body")


# --- the command line ----------------------------------------------------------------------


def test_eval_cli_prints_a_table_writes_json_and_shows_progress(smollm2, tmp_path):
    from llmpress import compress

    out = tmp_path / "w4"
    compress(str(smollm2), str(out), "W4A16", group_size=64, progress=False)
    figures = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmpress.cli",
            "eval",
            str(out),
            "--base",
            str(smollm2),
            "--seq-len",
            str(SEQ),
            "--windows",
            "2",
            "--device",
            "cpu",
            "--json",
            str(figures),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(figures.read_text())
    assert data["windows"] == 2 and data["tokens_scored"] == 2 * (SEQ - 1)
    assert data["perplexity"] > data["base_perplexity"] > 1
    assert data["kl_divergence"] > 0 and 0 < data["top1_agreement"] < 1
    assert data["compression_ratio"] == pytest.approx(data["base_size_bytes"] / data["size_bytes"])
    assert f"{data['perplexity']:.4f}" in proc.stdout
    assert "top-1 agreement with base" in proc.stdout
    assert "2/2" in proc.stderr  # the progress bar: windows done


def test_eval_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llmpress.cli", "eval", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a model: it has no config.json"
    ]


def test_eval_cli_unknown_lm_eval_task_fails_early_in_one_line(smollm2):
    proc = subprocess.run(
        [sys.executable, "-m", "llmpress.cli", "eval", str(smollm2), "--tasks", "hellaswg",
         "--seq-len", str(SEQ), "--windows", "1", "--device", "cpu"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()[-1:]
    if importlib.util.find_spec("lm_eval") is None:  # the newest environment has no extras
        assert line.startswith("error: lm-eval tasks hellaswg need the lm-evaluation-harness")
        assert "pip install 'llmpress[lmeval]'" in line
    else:
        assert line.startswith("error: Unknown lm-eval task 'hellaswg'") and "hellaswag" in line
    assert "window" not in proc.stderr  # failed before scoring any window
