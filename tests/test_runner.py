"""The layer runner: layer by layer, one layer holding weights at a time, it computes exactly
what the whole model computes, for every family (masks and position embeddings passed as the
model passes them, per layer type in Gemma3) and for the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmpress.data import calibration_set
from llmpress.runner import LayerRunner
from llmpress.source import ModelSource

FAMILIES = ("llama", "qwen3", "mistral", "gemma3", "phi3")


def _final_hidden(model, sample: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output, before the final norm."""
    captured = {}
    last = model.model.layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: captured.update(out=out))
    with torch.inference_mode():
        model(sample.unsqueeze(0), use_cache=False)
    handle.remove()
    return captured["out"]


def _check_equals_whole_model(path, samples):
    runner = LayerRunner(ModelSource.open(path))
    seen = []

    def on_layer(index, layer):
        # Only this layer holds weights; the others are on the meta device.
        for i, other in enumerate(runner.layers):
            devices = {p.device.type for p in other.parameters()}
            assert devices == ({"cpu"} if i == index else {"meta"}), (i, index, devices)
        seen.append(index)

    for _ in runner.run(samples, on_layer):
        pass
    assert seen == list(range(len(runner.layers)))
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for sample, hidden in zip(samples, runner.hidden_states(), strict=True):
        assert torch.equal(hidden, _final_hidden(whole, sample))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_the_whole_model(family, tiny_models):
    torch.manual_seed(0)
    # 100 tokens: past Gemma3's 64-token sliding window; lengths differ, nothing is padded.
    samples = [torch.randint(3, 500, (n,)) for n in (100, 23)]
    _check_equals_whole_model(tiny_models[family], samples)


def test_smollm2_on_real_calibration_text(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chosen = calibration_set("pydoc-calibration", tokenizer, num_samples=3, seq_len=128)
    _check_equals_whole_model(smollm2, chosen.samples)


def test_capture_restores_the_layers(tiny_llama):
    runner = LayerRunner(ModelSource.open(tiny_llama))
    before = list(runner.layers)
    batches = runner.capture([torch.arange(3, 20)])
    assert list(runner.layers) == before
    assert set(batches[0].calls) == set(range(len(before)))
    assert runner.cache.get(0).shape == (1, 17, 256)
