"""FP8 KV cache (`--kv-cache`): k/v scales calibrated on real text (SmolLM2), written, used."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from compressed_tensors.modeling.kvcache import register_key_hook, register_value_hook
from helpers import COMPUTE_DTYPE, load_transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama.modeling_llama import LlamaAttention

from llmpress import compress
from llmpress.algorithms.kvcache import (
    KVCacheCalibration,
    attention_modules,
    cache_argument,
    kv_cache_args,
)
from llmpress.cli import main, run
from llmpress.corpora import load_text
from llmpress.data import calibration_set
from llmpress.errors import LlmpressError
from llmpress.evaluate.checkpoint_eval import evaluate_checkpoint, format_report
from llmpress.evaluate.loading import kv_cache_not_applied
from llmpress.runner import LayerRunner
from llmpress.source import ModelSource

# One torch thread: on the shared 2-core runner, two contend with other work and every
# compress and forward here runs ~10x slower (97 s instead of 10 s for one compress, measured).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

CALIBRATION = dict(dataset="pydoc-calibration", num_samples=4, seq_len=64, seed=0)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
LAYERS, KV_HEADS = 30, 3  # SmolLM2-135M


@pytest.fixture(scope="module")
def static_kv(smollm2, tmp_path_factory) -> Path:
    """FP8 weights, static input scales and per-tensor k/v scales, in one calibrated pass."""
    out = tmp_path_factory.mktemp("kv") / "fp8-kv"
    return compress(smollm2, out, "FP8", kv_cache="fp8", progress=False, **CALIBRATION).output


@pytest.fixture(scope="module")
def dynamic_head_kv(smollm2, tmp_path_factory) -> Path:
    """A data-free weight scheme, calibrated for the cache alone: per-head k/v scales."""
    out = tmp_path_factory.mktemp("kv") / "fp8-dynamic-kv-head"
    return compress(
        smollm2, out, "FP8_DYNAMIC", kv_cache="fp8-head", progress=False, **CALIBRATION
    ).output


@pytest.fixture(scope="module")
def samples(smollm2) -> list[torch.Tensor]:
    """The very samples the fixtures were calibrated on."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    sizes = {k: v for k, v in CALIBRATION.items() if k != "dataset"}
    return calibration_set(CALIBRATION["dataset"], tokenizer, **sizes).samples


def _kv_scales(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(checkpoint / "model.safetensors", "pt") as reader:
        return {
            key: reader.get_tensor(key)
            for key in reader.keys()  # noqa: SIM118
            if key.endswith(("k_scale", "v_scale"))
        }


def _expected_scale(absmax_per_head: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Symmetric fp8: absmax / 448 in fp32, stored in the model's dtype."""
    if per_head:
        return (absmax_per_head / FP8_MAX).to(torch.bfloat16).reshape(-1, 1, 1)
    return (absmax_per_head.max() / FP8_MAX).to(torch.bfloat16).reshape(1)


def _track_absmax(amax: dict, key: str, x: torch.Tensor) -> None:
    """Per-head absmax of (batch, kv_heads, seq, head_dim), running over calls."""
    head = x.abs().amax(dim=(0, 2, 3)).float()
    amax[key] = torch.maximum(amax[key], head) if key in amax else head


@pytest.mark.parametrize("name", ["static_kv", "dynamic_head_kv"])
def test_scales_equal_the_keys_and_values_transformers_caches_from_the_checkpoint(
    name, request, samples
):
    """Independent computation, every layer: transformers serves the checkpoint (compressed
    weights, quantized inputs, and each layer's fp8 cache feeding the next), and
    compressed-tensors' own key/value hooks see what it caches (keys after rotary) just
    before quantizing it. Their absmax over the calibration samples, / 448, is the scale.
    transformers computes in what calibration computes in here (COMPUTE_DTYPE)."""
    checkpoint = request.getfixturevalue(name)
    per_head = name == "dynamic_head_kv"
    model = load_transformers(checkpoint, decompress=False, dtype=COMPUTE_DTYPE)
    note = kv_cache_not_applied(model)
    # compressed-tensors (<= 0.20.1) hooks the cache argument by its old names; transformers
    # from 5.24 calls it `cache`: then the checkpoint runs with an unquantized cache, and
    # llmpress says so (eval prints the note) instead of scoring it as if it had one.
    renamed = cache_argument(model.model.layers[0].self_attn) == "cache"
    assert (note is not None) == renamed, note
    if renamed:
        assert "does not quantize the KV cache" in note and transformers.__version__ in note
        return
    amax: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for kind, register in (("k", register_key_hook), ("v", register_value_hook)):
            key = f"model.layers.{i}.self_attn.{kind}_scale"
            register(layer.self_attn, lambda m, x, key=key: _track_absmax(amax, key, x))
    with torch.inference_mode():
        for sample in samples:
            model(sample.unsqueeze(0))
    stored = _kv_scales(checkpoint)
    assert sorted(stored) == sorted(amax) and len(stored) == 2 * LAYERS
    for key, absmax in amax.items():
        assert torch.equal(stored[key], _expected_scale(absmax, per_head)), key


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_keys_are_observed_as_each_family_caches_them(family, tiny_models):
    """After q/k norms (Qwen3, Gemma3) and rotary, from a fused qkv_proj (Phi3), over a sliding
    window (Gemma3): the observed ranges equal those of transformers' own DynamicCache."""
    checkpoint = tiny_models[family]
    torch.manual_seed(0)
    ids = [torch.randint(3, 512, (40,)) for _ in range(3)]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    amax: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for sample in ids:
            cache = model(sample.unsqueeze(0), use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                _track_absmax(amax, f"{i}.k", layer.keys)
                _track_absmax(amax, f"{i}.v", layer.values)

    source = ModelSource.open(checkpoint)
    runner = LayerRunner(source)
    runner.capture(ids)
    calibration = KVCacheCalibration(kv_cache_args("fp8-head"))
    for index in range(len(runner.layers)):
        layer = runner.load_layer(index)
        attentions = attention_modules(layer, f"{source.layer_prefix}.{index}.")
        assert len(attentions) == 1
        hooks = calibration.observe(attentions)
        runner.forward_layer(index)
        for hook in hooks:
            hook.remove()
        (scales,) = calibration.scales(attentions, torch.bfloat16).values()
        for kind in "kv":
            expected = _expected_scale(amax[f"{index}.{kind}"], per_head=True)
            assert torch.equal(scales[f"{kind}_scale"], expected), (index, kind)
        runner.unload_layer(index)


def test_scales_are_written_in_the_shapes_and_config_readers_expect(static_kv, dynamic_head_kv):
    for checkpoint, strategy, shape in (
        (static_kv, "tensor", (1,)),
        (dynamic_head_kv, "attn_head", (KV_HEADS, 1, 1)),
    ):
        qconfig = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
        scheme = qconfig["kv_cache_scheme"]
        assert (scheme["num_bits"], scheme["type"], scheme["strategy"]) == (8, "float", strategy)
        assert scheme["symmetric"] is True and scheme["dynamic"] is False
        stored = _kv_scales(checkpoint)
        assert sorted(stored) == sorted(
            f"model.layers.{i}.self_attn.{kind}_scale" for i in range(LAYERS) for kind in "kv"
        )
        for key, scale in stored.items():
            assert scale.dtype == torch.bfloat16 and scale.shape == shape, key
            assert bool((scale > 0).all()), key
        assert f"strategy: {strategy}" in (checkpoint / "recipe.yaml").read_text()
    # The static FP8 scheme kept its input scales in the same pass.
    with safe_open(static_kv / "model.safetensors", "pt") as reader:
        assert sum(key.endswith(".input_scale") for key in reader.keys()) == LAYERS * 7  # noqa: SIM118
    manifest = json.loads((dynamic_head_kv / "llmpress.json").read_text())
    assert manifest["options"]["kv_cache"] == "fp8-head"
    assert manifest["calibration"]["samples"] == CALIBRATION["num_samples"]


def _without_kv_cache_scheme(checkpoint: Path, out: Path) -> Path:
    """The same tensors (linked), with `kv_cache_scheme` dropped from the config."""
    out.mkdir()
    for file in checkpoint.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["quantization_config"]["kv_cache_scheme"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p, q = reference.float().log_softmax(-1), other.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_transformers_loads_the_scales_and_uses_them(smollm2, static_kv, tmp_path):
    """The attention modules hold the stored scales; the cache quantized with them changes
    the logits, which stay close to the base model's on held-out text. Where transformers
    runs the checkpoint without its fp8 cache (from 5.24, see above), `llmpress eval` says
    so in a note, and only there."""
    report = evaluate_checkpoint(
        static_kv, windows=1, seq_len=32, device="cpu", progress=False, dataset="pydoc"
    )
    renamed = "cache" in inspect.signature(LlamaAttention.forward).parameters
    assert (report.kv_cache_note is not None) == renamed, report.kv_cache_note
    if renamed:
        assert f"note: {report.kv_cache_note}" in format_report(report)
        return
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer(load_text("pydoc")[:4000], return_tensors="pt").input_ids[:, :128]
    ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    model = load_transformers(static_kv, decompress=False)
    stored = _kv_scales(static_kv)
    for i, layer in enumerate(model.model.layers):
        for kind in "kv":
            held = getattr(layer.self_attn, f"{kind}_scale")
            assert torch.equal(held.data, stored[f"model.layers.{i}.self_attn.{kind}_scale"])
    plain = load_transformers(_without_kv_cache_scheme(static_kv, tmp_path / "plain"), False)
    base = load_transformers(smollm2, decompress=False)
    with torch.inference_mode():
        with_kv, without_kv, reference = (m(ids).logits for m in (model, plain, base))
    assert not torch.equal(with_kv, without_kv)
    # Measured KL to the base: 0.051 without the fp8 cache, 0.075 with it (calibrated on
    # 4 x 64 tokens; 0.04-0.07 with 8 x 64, on 128-token windows). 135M parameters feel it.
    assert _kl(reference, with_kv) < _kl(reference, without_kv) + 0.05
    assert _kl(reference, with_kv) < 0.15


def test_kv_cache_without_calibration_text_is_refused(smollm2, tmp_path, monkeypatch, capsys):
    with pytest.raises(LlmpressError, match=r"--kv-cache fp8 quantizes keys and values with stat"):
        compress(smollm2, tmp_path / "x", "W4A16", group_size=64, kv_cache="fp8", progress=False)
    assert not (tmp_path / "x").exists()
    argv = ["llmpress", "compress", str(smollm2), "-o", str(tmp_path / "y")]
    monkeypatch.setattr(sys, "argv", [*argv, "--scheme", "FP8_DYNAMIC", "--kv-cache", "fp8-head"])
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --kv-cache fp8-head quantizes keys and values with static scales, computed "
        "from calibration text: give --dataset (e.g. pydoc-calibration, or a .txt/.jsonl file)"
    )
    assert not (tmp_path / "y").exists()


def test_unknown_kv_cache_value_is_refused(smollm2, tmp_path):
    with pytest.raises(LlmpressError, match=r"kv_cache: Input should be 'fp8' or 'fp8-head'"):
        compress(smollm2, tmp_path / "x", "FP8_DYNAMIC", kv_cache="int8", dataset="pydoc")
    result = CliRunner().invoke(
        main,
        ["compress", str(smollm2), "-o", str(tmp_path / "y"), "--scheme", "FP8_DYNAMIC"]
        + ["--kv-cache", "int8"],
    )
    assert result.exit_code == 2
    assert "Invalid value for '--kv-cache': 'int8' is not one of 'fp8', 'fp8-head'" in (
        result.output
    )
