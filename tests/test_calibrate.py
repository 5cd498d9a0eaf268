"""FP8 with static activation scales, calibrated layer by layer on real text (SmolLM2)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import layer0_inputs, module_inputs
from safetensors import safe_open

from llmpress import compress
from llmpress.errors import LlmpressError
from llmpress.evaluate.checkpoint_eval import evaluate_checkpoint

CALIBRATION = dict(dataset="pydoc-calibration", num_samples=8, seq_len=64, seed=0)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@pytest.fixture(scope="module")
def fp8_static(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "fp8-static"
    compress(str(smollm2), str(out), "FP8", progress=False, **CALIBRATION)
    return out


def _stored(checkpoint, name):
    with safe_open(checkpoint / "model.safetensors", "pt") as reader:
        return reader.get_tensor(name)


def test_first_layer_scales_equal_an_independent_computation(smollm2, fp8_static):
    names = ("self_attn.q_proj", "mlp.down_proj")
    absmax = {
        k: float(x.abs().max()) for k, x in layer0_inputs(smollm2, names, CALIBRATION).items()
    }
    for key in names:
        expected = torch.tensor(absmax[key] / FP8_MAX).to(torch.bfloat16)
        stored = _stored(fp8_static, f"model.layers.0.{key}.input_scale")
        assert stored.dtype == torch.bfloat16 and stored.shape == (1,)
        assert stored[0] == expected, key


def test_every_quantized_module_has_an_input_scale_and_the_config_says_static(fp8_static):
    config = json.loads((fp8_static / "config.json").read_text())["quantization_config"]
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is False and acts["strategy"] == "tensor" and acts["type"] == "float"
    with safe_open(fp8_static / "model.safetensors", "pt") as reader:
        keys = set(reader.keys())
    weights = {k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale")}
    assert len(weights) == 30 * 7
    assert {k.removesuffix(".input_scale") for k in keys if k.endswith(".input_scale")} == weights
    # q, k and v read the same input: one scale.
    assert _stored(fp8_static, "model.layers.7.self_attn.q_proj.input_scale") == _stored(
        fp8_static, "model.layers.7.self_attn.v_proj.input_scale"
    )
    manifest = json.loads((fp8_static / "llmpress.json").read_text())
    assert manifest["calibration"]["samples"] == 8 and len(manifest["calibration"]["sha256"]) == 64


def test_transformers_loads_it_close_to_the_base(smollm2, fp8_static):
    report = evaluate_checkpoint(fp8_static, base=smollm2, seq_len=96, windows=2, device="cpu")
    assert report.quality.kl_divergence < 0.15 and report.quality.top1_agreement > 0.8


def test_same_data_and_seed_give_identical_bytes(smollm2, fp8_static, tmp_path):
    again = tmp_path / "again"
    compress(str(smollm2), str(again), "FP8", progress=False, **CALIBRATION)
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        assert (again / name).read_bytes() == (fp8_static / name).read_bytes(), name


def test_static_scheme_without_data_is_refused(smollm2, tmp_path):
    with pytest.raises(LlmpressError, match="static scales, computed from calibration text"):
        compress(str(smollm2), str(tmp_path / "x"), "FP8", progress=False)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def first_layer_inputs(tokenized_llama):
    """Layer 0's inputs (q/k/v, down_proj) for the calibration samples: any static scheme's
    layer-0 scales derive from them."""
    return layer0_inputs(tokenized_llama, ("self_attn.q_proj", "mlp.down_proj"), CALIBRATION)


@pytest.mark.parametrize("scheme", ["W8A8_STATIC", "NVFP4"])
def test_int8_and_nvfp4_static_scales_equal_an_independent_computation(
    scheme, tokenized_llama, first_layer_inputs, tmp_path
):
    out = tmp_path / scheme
    compress(str(tokenized_llama), str(out), scheme, progress=False, **CALIBRATION)
    for key, inputs in first_layer_inputs.items():
        absmax = float(inputs.abs().max())
        if scheme == "W8A8_STATIC":  # symmetric int8: the largest magnitude maps to 127.5
            stored = _stored(out, f"model.layers.0.{key}.input_scale")
            expected = torch.tensor(absmax * 2 / 255).to(torch.bfloat16)
            assert stored.dtype == torch.bfloat16 and stored.shape == (1,)
        else:  # NVFP4: the global scale maps the largest magnitude to fp8 max x fp4 max
            stored = _stored(out, f"model.layers.0.{key}.input_global_scale")
            expected = torch.tensor(448.0 * 6.0 / absmax, dtype=torch.float32)
            assert stored.dtype == torch.float32 and stored.shape == (1,)
        assert torch.allclose(stored[0].float(), expected.float(), rtol=1e-6), key
    # vLLM fuses q/k/v and gate/up: their input scales must be one.
    suffix = "input_scale" if scheme == "W8A8_STATIC" else "input_global_scale"
    for first, other in (
        ("self_attn.q_proj", "self_attn.k_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ):
        a = _stored(out, f"model.layers.5.{first}.{suffix}")
        assert torch.equal(a, _stored(out, f"model.layers.5.{other}.{suffix}"))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] == (False if scheme == "W8A8_STATIC" else "local")
    report = evaluate_checkpoint(out, base=tokenized_llama, seq_len=64, windows=2, device="cpu")
    assert report.quality.kl_divergence < 0.05  # loads in transformers, computes close


def test_propagate_original_calibrates_every_layer_on_the_original_model(tokenized_llama, tmp_path):
    """One pass per layer: every layer's scales are those of the uncompressed model's own
    activations (one plain float32 forward), where the default run's deep layers differ."""
    names = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
    inputs = module_inputs(tokenized_llama, names, CALIBRATION, layers=range(16))
    one_pass, default = tmp_path / "one-pass", tmp_path / "default"
    compress(str(tokenized_llama), str(one_pass), "FP8", progress=False, propagate="original",
             **CALIBRATION)  # fmt: skip
    compress(str(tokenized_llama), str(default), "FP8", progress=False, **CALIBRATION)
    differ = 0
    for key, x in inputs.items():
        expected = torch.tensor(float(x.abs().max()) / FP8_MAX).to(torch.bfloat16)
        assert _stored(one_pass, f"{key}.input_scale")[0] == expected, key
        differ += bool(_stored(default, f"{key}.input_scale")[0] != expected)
    assert differ > len(inputs) // 2  # the default calibrates on the compressed layers' outputs
    manifest = json.loads((one_pass / "llmpress.json").read_text())
    assert manifest["options"]["propagate"] == "original"
    report = evaluate_checkpoint(one_pass, base=tokenized_llama, seq_len=64, windows=2,
                                 device="cpu")  # fmt: skip
    assert report.quality.kl_divergence < 0.05
