"""Mixture-of-experts models (a tiny Qwen3-MoE): every expert projection is a Linear of its own,
run by the layer runner as transformers runs the fused experts, smoothed with its norm
(router included), quantized per expert and read back by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MOE_EXPERTS as EXPERTS
from conftest import MOE_LAYERS as LAYERS
from helpers import load_transformers, run_uncompressed, stored_modules
from safetensors.torch import load_file
from test_runner import _final_hidden
from test_smoothing import _layer_calls, _run
from transformers import AutoModelForCausalLM

from llmpress import compress
from llmpress.algorithms.smoothing import apply_scale, infer_mappings, load_tensors, module_tensors
from llmpress.experts import UnfusedExperts, unfuse_experts
from llmpress.runner import LayerRunner
from llmpress.source import ModelSource

CALIBRATION = dict(dataset="pydoc-calibration", num_samples=8, seq_len=64, seed=0)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_modules(layer: int) -> list[str]:
    return [
        f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(EXPERTS) for p in PROJECTIONS
    ]


def test_every_expert_projection_is_a_linear_and_runs_as_transformers_runs_it(tiny_moe):
    """The checkpoint stores one tensor per expert projection; the skeleton has a Linear for
    each, the decoder layers are found (not the longer list of experts), and the runner's
    hidden states equal transformers' fused forward, bit for bit."""
    source = ModelSource.open(tiny_moe)
    assert source.layer_prefix == "model.layers" and source.num_layers == LAYERS
    for name in _expert_modules(1):
        assert isinstance(source.modules[name], torch.nn.Linear), name
        assert f"{name}.weight" in source.tensor_entries
    samples = [torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(n))
               for n in (17, 17, 40)]  # fmt: skip
    runner = LayerRunner(source)
    run_uncompressed(runner, samples)
    whole = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.bfloat16).eval()
    assert type(whole.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"  # fused
    for sample, hidden in zip(samples, runner.hidden_states(), strict=True):
        assert torch.equal(hidden, _final_hidden(whole, sample))


def test_experts_share_their_norms_smoothing_and_the_function_is_kept(tiny_moe):
    """post_attention_layernorm -> every expert's gate/up, the router's weight scaled with
    them; up -> down inside each expert. Random scales on every mapping leave the logits as
    they were."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()
    ids = torch.randint(3, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        base = model(ids).logits
    tensors = load_file(tiny_moe / "model.safetensors")
    replaced = unfuse_experts(model, tensors)
    assert replaced == [f"model.layers.{i}.mlp.experts" for i in range(LAYERS)]
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    with torch.inference_mode():
        unfused = model(ids).logits
    assert ((unfused - base).norm() / base.norm()) < 1e-5
    calls = _layer_calls(model, ids)
    gen = torch.Generator().manual_seed(1)
    for index, layer in enumerate(model.model.layers):
        linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        found = infer_mappings(layer, linears, _run(layer, calls[index]), 64)
        names = {m.name for m in found.mappings}
        experts = "mlp.experts.*.gate_proj (x 8)/mlp.experts.*.up_proj (x 8)"
        assert names == {
            "input_layernorm -> self_attn.q_proj/self_attn.k_proj/self_attn.v_proj",
            "self_attn.v_proj -> self_attn.o_proj",
            f"post_attention_layernorm -> {experts}",
            *(f"mlp.experts.{e}.up_proj -> mlp.experts.{e}.down_proj" for e in range(EXPERTS)),
        }, found.skipped
        (moe,) = [m for m in found.mappings if m.smooth == "post_attention_layernorm"]
        assert moe.passengers == ("mlp.gate",) and len(moe.balance) == 2 * EXPERTS
        for mapping in found.mappings:
            touched = module_tensors(layer, mapping)
            columns = touched[f"{mapping.balance[0]}.weight"].shape[1]
            scale = torch.exp(torch.randn(mapping.channels(columns), generator=gen))
            apply_scale(mapping, scale, touched)
            load_tensors(layer, touched)
    with torch.inference_mode():
        smoothed = model(ids).logits
    assert ((smoothed - base).norm() / base.norm()) < 1e-4


@pytest.fixture(scope="module")
def calibrated(tiny_moe, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-out")
    runs = {
        "rtn": dict(),
        "awq": dict(method="awq", **CALIBRATION),
        "gptq": dict(method="gptq", **CALIBRATION),
    }
    return {
        name: compress(tiny_moe, root / name, "W4A16", group_size=64, progress=False, **kw).output
        for name, kw in runs.items()
    }


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq"])
def test_every_expert_is_quantized_and_transformers_reads_it(method, calibrated, tiny_moe):
    """Each expert projection stored packed under its own name, the router left in 16 bits;
    transformers loads the checkpoint into its fused experts, with the weights compressed-
    tensors decompresses."""
    out = calibrated[method]
    stored = stored_modules(out)
    for layer in range(LAYERS):
        for name in _expert_modules(layer):
            assert stored[name]["weight_packed"].dtype == torch.int32, name
        assert set(stored[f"model.layers.{layer}.mlp.gate"]) == {"weight"}
    model = load_transformers(out, decompress=True, dtype=torch.float32)
    fused = model.model.layers[1].mlp.experts.gate_up_proj  # [experts, 2 x inner, hidden]
    from helpers import ct_decompressed_weights

    weights = ct_decompressed_weights(out)
    for e in range(EXPERTS):
        gate = weights[f"model.layers.1.mlp.experts.{e}.gate_proj"].float()
        up = weights[f"model.layers.1.mlp.experts.{e}.up_proj"].float()
        assert torch.equal(fused[e].float(), torch.cat([gate, up])), e
    manifest = json.loads((out / "llmpress.json").read_text())
    if method == "gptq":  # every expert solved, each better than rounding to nearest
        for name in _expert_modules(1):
            report = manifest["gptq"][name]
            assert report["loss"] < report["loss_rtn"], name
        # the experts read one input: one Hessian, their gate/up solved stacked
        solved = manifest["gptq"]["model.layers.1.mlp.experts.5.up_proj"]["solved_with"]
        assert sorted(solved) == sorted(
            n for n in _expert_modules(1) if not n.endswith("down_proj")
        )
    if method == "awq":  # the experts' site searched, the router scaled with it
        site = manifest["smoothing"]["sites"]["model.layers.1.post_attention_layernorm"]
        assert site["loss"] <= site["loss_rtn"]
        router = "model.layers.1.mlp.gate"
        assert not stored[router]["weight"].equal(
            stored_modules(calibrated["rtn"])[router]["weight"]
        )


def test_calibrated_experts_beat_rounding_to_nearest(calibrated, tiny_moe):
    """On the calibration text, AWQ's and GPTQ's logits are closer to the base model's than
    round-to-nearest's: what each method minimizes, through routed experts and the router."""
    from transformers import AutoTokenizer

    from llmpress.data import calibration_set

    tokenizer = AutoTokenizer.from_pretrained(tiny_moe)
    samples = calibration_set(CALIBRATION["dataset"], tokenizer, 8, 64, 0).samples
    with torch.no_grad():
        base = load_transformers(tiny_moe, False, torch.float32)
        want = [base(s[None]).logits for s in samples]
        error = {}
        for name, out in calibrated.items():
            model = load_transformers(out, True, torch.float32)
            got = [model(s[None]).logits for s in samples]
            error[name] = sum(float((g - w).norm() ** 2) for g, w in zip(got, want, strict=True))
    assert error["gptq"] < error["rtn"] and error["awq"] < error["rtn"], error
