"""Every data-free scheme, written and read back by transformers and compressed-tensors."""

from __future__ import annotations

import json
import shutil

import compressed_tensors
import pytest
import torch
import transformers
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from helpers import (
    ct_decompressed_weights,
    group_scheme,
    load_transformers,
    logits,
    relative_error,
    stored_modules,
)
from packaging.version import Version
from safetensors.torch import load_file

from llmpress import compress
from llmpress.observers import global_scale, weight_qparams
from llmpress.plan import FUSED_SIBLINGS
from llmpress.schemes import data_free_scheme_names as scheme_names

# Relative L2 error of the tiny model's logits against the unquantized model: loose enough for
# random weights, tight enough that a wrong scale, a transposed pack or a bad group fails.
LOGIT_BOUND = {
    "W2A16": 1.2,
    "W3A16": 0.9,
    "W4A16": 0.45,
    "W4A16_ASYM": 0.45,
    "W4A8": 0.45,
    "W4AFP8": 0.45,
    "W5A16": 0.23,
    "W6A16": 0.12,
    "W7A16": 0.06,
    "W8A16": 0.035,
    "W8A8": 0.05,
    "FP8_DYNAMIC": 0.15,
    "FP8_BLOCK": 0.15,
    "MXFP8A16": 0.12,
    "MXFP8": 0.15,
    "NVFP4A16": 0.3,
    "MXFP4A16": 0.4,
    "MXFP4": 0.6,
}


@pytest.fixture(scope="module")
def written(tiny_llama, tmp_path_factory):
    """Compress the tiny Llama once per scheme; tests share the outputs."""
    root = tmp_path_factory.mktemp("schemes")
    return {
        name: compress(tiny_llama, root / name, name, progress=False).output
        for name in scheme_names()
    }


def _original_weights(model_dir):
    return load_file(model_dir / "model.safetensors")


def _fused_global_scales(original, modules):
    """NVFP4 global scales computed independently: one amax over each fused sibling set."""
    scales = {}
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        siblings = next((s for s in FUSED_SIBLINGS if leaf in s), (leaf,))
        weights = [original[f"{parent}.{s}.weight"] for s in siblings]
        scales[module] = global_scale(weights)
    return scales


def test_every_scheme_has_a_bound():
    assert set(LOGIT_BOUND) == set(scheme_names())


@pytest.mark.parametrize("name", scheme_names())
def test_transformers_dequantizes_to_our_reference(name, written, tiny_llama):
    """(a) transformers' dequantized weights equal fake-quantize(original) with our qparams."""
    checkpoint = written[name]
    scheme = group_scheme(checkpoint)
    original = _original_weights(tiny_llama)
    model = load_transformers(checkpoint)
    loaded = dict(model.named_parameters())
    quantized = [m for m, s in stored_modules(checkpoint).items() if "weight_scale" in s]
    assert len(quantized) == 14 and "lm_head" not in quantized
    gscales = (
        _fused_global_scales(original, quantized)
        if scheme.weights.strategy == QuantizationStrategy.TENSOR_GROUP
        else {}
    )
    for module in quantized:
        weight = original[f"{module}.weight"]
        scale, zp = weight_qparams(weight, scheme.weights, "minmax", gscales.get(module))
        if scheme.weights.scale_dtype is None:
            scale = scale.to(weight.dtype)
        reference = fake_quantize(
            weight, scale, zp, scheme.weights, global_scale=gscales.get(module)
        )
        torch.testing.assert_close(
            loaded[f"{module}.weight"], reference.to(torch.bfloat16), rtol=0, atol=0
        )
    # Unquantized tensors pass through bit for bit.
    assert torch.equal(loaded["lm_head.weight"], original["lm_head.weight"])


@pytest.mark.parametrize("name", scheme_names())
def test_compressed_tensors_decompressor_matches_transformers(name, written):
    checkpoint = written[name]
    ours = ct_decompressed_weights(checkpoint)
    loaded = dict(load_transformers(checkpoint).named_parameters())
    assert len(ours) == 14
    for module, weight in ours.items():
        torch.testing.assert_close(
            loaded[f"{module}.weight"], weight.to(torch.bfloat16), rtol=0, atol=0
        )


@pytest.mark.parametrize("name", scheme_names())
def test_packed_bytes_equal_compressed_tensors_compressor(name, written, tiny_llama):
    """(c) Given our stored scales, compressed-tensors' compressor yields the same bytes."""
    checkpoint = written[name]
    scheme = group_scheme(checkpoint)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    original = _original_weights(tiny_llama)
    for module, state in stored_modules(checkpoint).items():
        if "weight_scale" not in state:
            continue
        # Scales and zero points in the form the compressor takes them (fp8/e8m0 scales and
        # packed zero points unpacked by compressed-tensors itself).
        unpacked = compressor.decompress(state, scheme)
        inputs = {"weight": original[f"{module}.weight"], "weight_scale": unpacked["weight_scale"]}
        for key in ("weight_zero_point", "weight_global_scale"):
            if key in state:
                inputs[key] = unpacked[key]
        expected = compressor.compress(inputs, scheme)
        assert set(expected) == set(state), module
        for key, tensor in expected.items():
            assert tensor.dtype == state[key].dtype and tensor.shape == state[key].shape, (
                module,
                key,
            )
            assert _as_bytes(tensor) == _as_bytes(state[key]), (module, key)


def _as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def logit_errors(written, tiny_llama) -> dict[str, float]:
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    base = logits(load_transformers(tiny_llama, decompress=False), ids)
    errors = {}
    for name, checkpoint in written.items():
        quant = logits(load_transformers(checkpoint, decompress=False), ids)
        assert torch.isfinite(quant).all(), name
        errors[name] = relative_error(quant, base)
    return errors


@pytest.mark.parametrize("name", scheme_names())
def test_logits_stay_close_to_base(name, logit_errors):
    """(b) The quantized model's logits stay within the scheme's bound of the base model's."""
    err = logit_errors[name]
    assert 0 < err < LOGIT_BOUND[name], f"{name}: relative logit error {err:.4f}"


def test_more_bits_means_smaller_error(logit_errors):
    ladder = [logit_errors[f"W{bits}A16"] for bits in range(2, 9)]
    assert ladder == sorted(ladder, reverse=True), ladder


def test_asymmetric_packed_weights_load_dequantized_in_transformers(written, tmp_path):
    """W4A16_ASYM's packed zero points do not load compressed in transformers >= 5.23 with
    compressed-tensors >= 0.18 (a size mismatch): its config asks transformers to load it
    dequantized, which computes the same logits. Only where no activation or KV cache
    quantization would be lost, and only for asymmetric packed weights."""
    dense = {
        name
        for name, path in written.items()
        if json.loads((path / "config.json").read_text())["quantization_config"].get("dequantize")
    }
    assert dense == {"W4A16_ASYM"}
    checkpoint = written["W4A16_ASYM"]
    # The same checkpoint without the key: loaded compressed where the versions allow, the
    # logits are the dequantized load's; elsewhere it fails as the key is there to avoid.
    compressed = tmp_path / "compressed"
    shutil.copytree(checkpoint, compressed)
    config = json.loads((compressed / "config.json").read_text())
    del config["quantization_config"]["dequantize"]
    (compressed / "config.json").write_text(json.dumps(config))
    ids = torch.arange(3, 35)[None]
    dense_logits = logits(load_transformers(checkpoint, decompress=False), ids)
    try:
        model = load_transformers(compressed, decompress=False)
    except RuntimeError as error:
        assert "weight_zero_point" in str(error) or "mismatch" in str(error), error
        assert Version(transformers.__version__) >= Version("5.23")
        assert Version(compressed_tensors.__version__) >= Version("0.18")
        return
    assert torch.equal(logits(model, ids), dense_logits)
