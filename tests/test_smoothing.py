"""Smoothing mappings inferred from the module graph of each family, and smoothing keeps the
model's function: the smoothed, unquantized model gives the original logits."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from llmpress.algorithms.smoothing import apply_scale, infer_mappings, load_tensors, module_tensors

ATTN, MLP = "self_attn", "mlp"
LLAMA_LIKE = {
    f"input_layernorm -> {ATTN}.q_proj/{ATTN}.k_proj/{ATTN}.v_proj",
    f"post_attention_layernorm -> {MLP}.gate_proj/{MLP}.up_proj",
    f"{ATTN}.v_proj -> {ATTN}.o_proj",
    f"{MLP}.up_proj -> {MLP}.down_proj",
}
EXPECTED = {
    "llama": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    # Gemma3's post_attention_layernorm normalizes the attention output; the MLP reads
    # pre_feedforward_layernorm.
    "gemma3": {m.replace("post_attention", "pre_feedforward") for m in LLAMA_LIKE},
    "phi3": {
        f"input_layernorm -> {ATTN}.qkv_proj",
        f"post_attention_layernorm -> {MLP}.gate_up_proj",
        f"{ATTN}.qkv_proj -> {ATTN}.o_proj",
        f"{MLP}.gate_up_proj -> {MLP}.down_proj",
    },
}


def _layer_calls(model, ids):
    """Each decoder layer's call arguments on `ids`, recorded on a plain forward."""
    calls = {}

    def record(index):
        def hook(module, args, kwargs):
            calls[index] = (args, kwargs)

        return hook

    hooks = [
        layer.register_forward_pre_hook(record(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.inference_mode():
        model(ids, use_cache=False)  # a cache would make every replay attend to the last
    for hook in hooks:
        hook.remove()
    return calls


def _run(layer, call):
    args, kwargs = call

    def run():
        with torch.inference_mode():
            out = layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return run


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smoothing_keeps_the_models_function(family, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = model(ids).logits
    calls = _layer_calls(model, ids)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    for index, layer in enumerate(model.model.layers):
        linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        found = infer_mappings(layer, linears, _run(layer, calls[index]), head_dim)
        assert {m.name for m in found.mappings} == EXPECTED[family], found.skipped
        for mapping in found.mappings:
            if mapping.norm:  # Gemma's norms scale by (1 + w)
                assert mapping.offset == (1.0 if family == "gemma3" else 0.0)
            tensors = module_tensors(layer, mapping)
            columns = tensors[f"{mapping.balance[0]}.weight"].shape[1]
            scale = torch.exp(torch.randn(mapping.channels(columns), generator=gen))
            before = {k: v.clone() for k, v in tensors.items()}
            apply_scale(mapping, scale, tensors)
            assert all(not torch.equal(before[k], tensors[k]) for k in before if "weight" in k)
            load_tensors(layer, tensors)
    with torch.inference_mode():
        smoothed = model(ids).logits
    error = (smoothed - base).norm() / base.norm()
    assert error < 1e-4, float(error)


def test_a_mapping_that_breaks_the_function_is_skipped(tiny_models):
    """A SiLU between up_proj and down_proj (as if the MLP were act(up) * gate) breaks the
    up -> down mapping: the check finds it and says so; the other mappings stay."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0]
    calls = _layer_calls(model, ids)
    mlp = layer.mlp
    mlp.forward = lambda x: mlp.down_proj(mlp.act_fn(mlp.up_proj(x)) * mlp.gate_proj(x))
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    found = infer_mappings(layer, linears, _run(layer, calls[0]), 64)
    names = {m.name for m in found.mappings}
    assert f"{MLP}.up_proj -> {MLP}.down_proj" not in names
    assert f"{ATTN}.v_proj -> {ATTN}.o_proj" in names
    (reason,) = found.skipped
    assert reason.startswith("mlp.up_proj -> mlp.down_proj: does not keep the layer's function")


def test_mappings_onto_unquantized_layers_are_skipped_with_a_reason(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0]
    calls = _layer_calls(model, ids)
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = linears - {"self_attn.k_proj", "mlp.down_proj"}
    found = infer_mappings(layer, quantized, _run(layer, calls[0]), 64)
    assert {m.name for m in found.mappings} == {
        f"post_attention_layernorm -> {MLP}.gate_proj/{MLP}.up_proj",
        f"{ATTN}.v_proj -> {ATTN}.o_proj",
    }
    assert sorted(found.skipped) == [
        "input_layernorm: also read by unquantized self_attn.k_proj",
        "mlp.up_proj -> mlp.down_proj: mlp.down_proj is not quantized",
    ]
