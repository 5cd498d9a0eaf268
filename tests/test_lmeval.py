"""lm-eval tasks on an in-memory model: numbers that agree with a direct computation, and
errors that say what to do when a task or its data is missing (tests run offline)."""

from __future__ import annotations

import json
import os
import random
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# lm-eval is part of the dev install (scripts/install.sh); its absence is a failure, not a skip.
import lm_eval  # noqa: E402, F401
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from llmpress.errors import LlmpressError  # noqa: E402
from llmpress.evaluate.lmeval import run_tasks  # noqa: E402

N_ITEMS, N_CHOICES = 20, 4


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2):
    # fp32 so that lm-eval's forward passes and ours give the same log-likelihoods
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2)


def continuation_items() -> list[dict]:
    """Sentences from the Python docs cut in half: the true second half vs three others'."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[key] for key in sorted(topics)))
    candidates = [
        s.split()
        for s in re.split(r"(?<=[.!?])\s+", text)
        if 14 <= len(s.split()) <= 30 and re.fullmatch(r"[A-Za-z ,;'()\-]+\.", s)
    ]
    # One sentence per second half: the docs repeat sentences, and equal choices would tie.
    by_ending = {" ".join(w[len(w) // 2 :]): w for w in candidates}
    sentences = sorted(by_ending.values())
    rng = random.Random(0)
    picked = rng.sample(sentences, N_ITEMS * N_CHOICES)
    halves = [(" ".join(w[: len(w) // 2]), " ".join(w[len(w) // 2 :])) for w in picked]
    items = []
    for i in range(N_ITEMS):
        context, truth = halves[i]
        others = [end for _, end in halves[N_ITEMS + i * (N_CHOICES - 1) :][: N_CHOICES - 1]]
        label = rng.randrange(N_CHOICES)
        choices = others[:label] + [truth] + others[label:]
        items.append({"context": context, "choices": choices, "label": label})
    return items


def write_local_task(folder, items: list[dict]) -> None:
    """A multiple-choice task whose data is a local JSON-lines file (absolute path)."""
    data = folder / "pydoc_continuation.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    task = {
        "task": "pydoc_continuation",
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": str(data)},
            "cache_dir": str(folder / "datasets-cache"),
        },
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / "pydoc_continuation.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


@torch.no_grad()
def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of the continuation's token log-probs: the whole text is tokenized and split after
    the context's tokens, so word boundaries tokenize as they do in running text."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    logprobs = model(torch.tensor([whole[:-1]])).logits[0].float().log_softmax(-1)
    targets = torch.tensor(whole[n_context:])
    return float(logprobs[n_context - 1 :].gather(1, targets[:, None]).sum())


def test_local_task_accuracy_matches_direct_loglikelihood_scoring(smollm2_loaded, tmp_path):
    model, tokenizer = smollm2_loaded
    items = continuation_items()
    write_local_task(tmp_path, items)

    torch.manual_seed(1234)
    # Batches of 4 padded sequences in lm-eval, one unpadded sequence at a time below.
    results = run_tasks(
        model, tokenizer, ["pydoc_continuation"], include_path=tmp_path, batch_size=4
    )
    after_run = torch.rand(3)

    correct = 0
    for item in items:
        scores = [
            continuation_logprob(model, tokenizer, item["context"], " " + choice)
            for choice in item["choices"]
        ]
        best, second = sorted(scores, reverse=True)[:2]
        assert best - second > 1e-3, "a near tie: batching noise could decide it either way"
        correct += max(range(N_CHOICES), key=scores.__getitem__) == item["label"]
    expected = correct / N_ITEMS

    assert set(results) == {"pydoc_continuation"}
    metrics = results["pydoc_continuation"]
    assert metrics["acc"] == pytest.approx(expected, abs=1e-9)
    assert metrics["acc"] >= 0.6, f"accuracy {metrics['acc']} is near chance (0.25)"
    assert 0 < metrics["acc_stderr"] < 0.2
    torch.manual_seed(1234)  # lm-eval reseeds torch; run_tasks gives the caller its RNG back
    assert torch.equal(after_run, torch.rand(3))


def test_unknown_task_names_it_and_suggests_close_matches(smollm2_loaded):
    model, tokenizer = smollm2_loaded
    with pytest.raises(LlmpressError, match="Unknown lm-eval task 'hellaswg'") as caught:
        run_tasks(model, tokenizer, ["hellaswg"])
    assert "close matches: hellaswag" in str(caught.value)


def test_hub_task_offline_says_data_is_not_available(smollm2_loaded, tmp_path, monkeypatch):
    import datasets

    # An empty datasets cache, so a machine that once downloaded hellaswag sees the same.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    model, tokenizer = smollm2_loaded
    with pytest.raises(LlmpressError) as caught:
        run_tasks(model, tokenizer, ["hellaswag"], limit=2)
    message = str(caught.value)
    assert "'hellaswag' needs dataset 'Rowan/hellaswag'" in message
    assert "not available offline" in message
    assert "HF_HUB_OFFLINE" in message and "include_path" in message
    assert "\n" not in message


def test_local_task_with_missing_data_file_names_the_file(smollm2_loaded, tmp_path):
    model, tokenizer = smollm2_loaded
    write_local_task(tmp_path, continuation_items()[:2])
    (tmp_path / "pydoc_continuation.jsonl").unlink()
    with pytest.raises(LlmpressError, match="could not read its local data files") as caught:
        run_tasks(model, tokenizer, ["pydoc_continuation"], include_path=tmp_path)
    assert str(tmp_path / "pydoc_continuation.jsonl") in str(caught.value)
