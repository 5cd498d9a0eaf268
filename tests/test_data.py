"""Calibration samples: deterministic, BOS first, never padded, fingerprinted, and clear errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoTokenizer

from llmpress.corpora import load_text
from llmpress.data import calibration_set
from llmpress.errors import LlmpressError


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


def test_same_seed_same_samples_other_seed_other_samples(tokenizer):
    first = calibration_set("pydoc-calibration", tokenizer, num_samples=32, seq_len=128, seed=0)
    again = calibration_set("pydoc-calibration", tokenizer, num_samples=32, seq_len=128, seed=0)
    other = calibration_set("pydoc-calibration", tokenizer, num_samples=32, seq_len=128, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first.samples, again.samples, strict=True))
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert first.to_json()["samples"] == 32 and first.tokens == sum(map(len, first.samples))


def test_samples_start_with_bos_fit_the_window_and_hold_no_padding(tokenizer):
    chosen = calibration_set("pydoc-calibration", tokenizer, num_samples=64, seq_len=96)
    for sample in chosen.samples:
        assert sample[0] == tokenizer.bos_token_id
        assert 16 <= len(sample) <= 96
        assert (sample[1:] != tokenizer.bos_token_id).all()
    assert max(len(s) for s in chosen.samples) == 96


def test_calibration_text_is_not_evaluation_text(tokenizer):
    # Each sample comes from the calibration topics, which no evaluation topic shares
    # (tests/test_evaluate.py checks the split). Short phrases recur across pydoc's topics, so
    # provenance is what can be checked, not absence of every phrase from the other part.
    chosen = calibration_set("pydoc-calibration", tokenizer, num_samples=16, seq_len=64)
    calibration = load_text("pydoc-calibration")
    for sample in chosen.samples:
        assert tokenizer.decode(sample[1:]) in calibration
    with pytest.raises(LlmpressError, match="evaluation text"):
        calibration_set("pydoc", tokenizer, num_samples=4)


def test_fingerprint_is_sha256_of_lengths_and_ids(tokenizer):
    chosen = calibration_set("pydoc-calibration", tokenizer, num_samples=4, seq_len=64)
    digest = hashlib.sha256()
    for sample in chosen.samples:
        ids = sample.tolist()
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(b"".join(i.to_bytes(8, "little", signed=True) for i in ids))
    assert chosen.fingerprint == digest.hexdigest()


def test_short_rows_stay_short_and_unpadded(tokenizer, tmp_path):
    texts = [
        "The quick brown fox jumps over the lazy dog, and then it keeps on running far away "
        "into the forest.",
        "A much longer sentence, which goes on and on about nothing in particular, "
        "until it finally reaches the end of what it wanted to say here.",
    ]
    data = tmp_path / "rows.jsonl"
    rows = [*texts, "Too short."]  # under 16 tokens: dropped, carries no useful statistics
    data.write_text("\n".join(json.dumps({"text": t}) for t in rows))
    chosen = calibration_set(str(data), tokenizer, num_samples=2, seq_len=128)
    expected = sorted(
        [tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"]]
        for t in texts
    )
    assert sorted(s.tolist() for s in chosen.samples) == expected


def test_chat_messages_go_through_the_chat_template_with_one_bos(tokenizer, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}: what is a list in Python?"},
                      {"role": "assistant", "content": "An ordered, mutable sequence."}]}
        for i in range(3)
    ]  # fmt: skip
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    chosen = calibration_set(str(data), tokenizer, num_samples=3, seq_len=256)
    rendered = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    for sample in chosen.samples:
        assert sample[0] == tokenizer.bos_token_id and sample[1] != tokenizer.bos_token_id
        assert tokenizer.decode(sample) in rendered


def test_too_little_text_says_how_many_samples_it_holds(tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(load_text("pydoc-calibration")[:3000])
    with pytest.raises(LlmpressError, match=r"yields \d+ samples .* ask for --num-samples \d+"):
        calibration_set(str(small), tokenizer, num_samples=500, seq_len=128)


def test_unknown_source_and_missing_column_are_clear(tokenizer, tmp_path):
    with pytest.raises(
        LlmpressError, match=r"neither a file, a built-in text \(.*\) nor a hub dataset name"
    ):
        calibration_set("no-such-file.txt", tokenizer)
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"body": "text under another name"}))
    with pytest.raises(LlmpressError, match="neither a 'text' nor a 'messages' column"):
        calibration_set(str(data), tokenizer, num_samples=1)


def test_hub_dataset_offline_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LlmpressError, match="cannot load calibration dataset 'someone/absent'"):
        calibration_set("someone/absent", tokenizer, num_samples=1)
