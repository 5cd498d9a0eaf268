"""The layer runner: layer by layer, one layer holding weights at a time, it computes exactly
what the whole model computes, for every family (masks and position embeddings passed as the
model passes them, per layer type in Gemma3), for the real SmolLM2 and for a BERT encoder
(layers called with positional arguments, padded samples with their attention mask)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES
from helpers import run_uncompressed
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from llmpress.data import calibration_set
from llmpress.runner import LayerRunner
from llmpress.source import ModelSource


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

    run_uncompressed(runner, samples, on_layer)
    assert seen == list(range(len(runner.layers)))
    whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    for sample, hidden in zip(samples, runner.hidden_states(), strict=True):
        assert torch.equal(hidden, _final_hidden(whole, sample))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_layer_by_layer_equals_the_whole_model(family, tiny_models):
    torch.manual_seed(0)
    # 100 tokens: past Gemma3's 64-token sliding window; lengths differ, nothing is padded.
    samples = [torch.randint(3, 500, (n,)) for n in (100, 23)]
    _check_equals_whole_model(tiny_models[family], samples)


def test_smollm2_on_real_calibration_text(smollm2):
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


# Which layers of the tiny models attend through a 64-token sliding window (conftest.FAMILIES);
# the others attend causally to every earlier token.
SLIDING = {"mistral": (True, True), "gemma3": (True, False)}


def _allowed(mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """(query, key) pairs a layer may attend to: its 4-D mask, boolean or additive; None is
    what the model passes when SDPA's own causal mask suffices."""
    if mask is None:
        return torch.ones(length, length, dtype=torch.bool).tril()
    mask = mask[0, 0]
    return mask if mask.dtype == torch.bool else mask == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_layer_gets_the_mask_of_its_attention_type(family, tiny_models):
    length, window = 100, 64
    runner = LayerRunner(ModelSource.open(tiny_models[family]))
    (batch,) = runner.capture([torch.randint(3, 500, (length,))])
    distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # query - key
    for index, sliding in enumerate(SLIDING.get(family, (False, False))):
        expected = (distance >= 0) & (distance < window) if sliding else distance >= 0
        got = _allowed(batch.calls[index].get("attention_mask"), length)
        assert torch.equal(got, expected), (family, index)
        torch.testing.assert_close(batch.calls[index]["position_ids"][0], torch.arange(length))


def test_gemma3_sliding_and_global_layers_get_their_own_rotary_tables(tiny_models):
    runner = LayerRunner(ModelSource.open(tiny_models["gemma3"]))
    (batch,) = runner.capture([torch.randint(3, 500, (40,))])
    config = runner.source.config
    positions = torch.arange(40, dtype=torch.float64)[:, None]
    for index, kind in enumerate(config.layer_types):
        theta = config.rope_parameters[kind]["rope_theta"]
        half = torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim
        angles = positions / theta**half
        cos, sin = batch.calls[index]["position_embeddings"]
        expected = torch.cat([angles, angles], dim=-1)
        torch.testing.assert_close(cos[0].double(), expected.cos(), atol=1e-2, rtol=0)
        torch.testing.assert_close(sin[0].double(), expected.sin(), atol=1e-2, rtol=0)
    assert math.isclose(config.rope_parameters["full_attention"]["rope_theta"], 1e6)


def _run_all_layers(runner: LayerRunner, samples, masks=None) -> list[torch.Tensor]:
    runner.capture(samples, masks)
    for index in range(len(runner.layers)):
        runner.load_layer(index)
        runner.forward_layer(index)
        runner.unload_layer(index)
    return runner.hidden_states()


def test_llama_left_padded_sample_with_its_mask_equals_the_whole_model(tiny_llama):
    ids = torch.randint(3, 500, (30,))
    mask = torch.ones(30, dtype=torch.int64)
    mask[:7] = 0  # left padding, as generation batches pad
    (hidden,) = _run_all_layers(LayerRunner(ModelSource.open(tiny_llama)), [ids], [mask])
    whole = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).eval()
    captured = {}
    handle = whole.model.layers[-1].register_forward_hook(lambda m, a, out: captured.update(o=out))
    with torch.inference_mode():
        whole(ids[None], attention_mask=mask[None], use_cache=False)
    handle.remove()
    assert torch.equal(hidden[:, 7:], captured["o"][:, 7:])


def test_bert_encoder_layer_by_layer_equals_the_whole_model(minilm):
    """MiniLM (BERT): its encoder calls layers with the mask as a positional argument; a padded
    sample carries its attention mask. Every sample equals the whole model run on it alone."""
    source = ModelSource.open(minilm)
    assert type(source.modules[""]).__name__ == "BertModel"
    assert (source.layer_prefix, source.num_layers) == ("encoder.layer", 6)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    texts = ["A short one.", "Layer by layer, one resident at a time, the same numbers come out."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    samples, masks = list(batch.input_ids), list(batch.attention_mask)
    assert masks[0].sum() < len(masks[0])  # the first one is padded
    runner = LayerRunner(source)
    states = _run_all_layers(runner, samples, masks)
    assert {p.device.type for p in runner.layers.parameters()} == {"meta"}
    unpadded = _run_all_layers(runner, [samples[1]])  # no mask given: all tokens real
    whole = AutoModel.from_pretrained(minilm).eval()
    with torch.inference_mode():
        for ids, mask, hidden in zip(samples, masks, states, strict=True):
            expected = whole(ids[None], attention_mask=mask[None]).last_hidden_state
            assert torch.equal(hidden, expected)
        assert torch.equal(unpadded[0], whole(samples[1][None]).last_hidden_state)
