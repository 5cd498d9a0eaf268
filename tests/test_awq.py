"""AWQ (`--method awq`) and SmoothQuant (`--method smoothquant[+gptq]`) in calibrated runs:
every family is smoothed through its inferred mappings and stays close to the base, AWQ's
search never does worse than round-to-nearest, SmoothQuant eases W8A8 on real weights, and
AWQ beats round-to-nearest on SmolLM2's held-out text."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILIES
from helpers import load_transformers, logits, relative_error, stored_modules
from safetensors.torch import load_file
from transformers import AutoTokenizer

from llmpress import compress
from llmpress.algorithms.awq import clip_search, search_scale
from llmpress.algorithms.columns import rtn_dequantized
from llmpress.algorithms.smoothing import Mapping
from llmpress.cli import main as cli
from llmpress.corpora import load_text
from llmpress.errors import LlmpressError
from llmpress.schemes import build_scheme

TINY_CALIBRATION = dict(num_samples=3, seq_len=32, seed=0)
CALIBRATION = dict(dataset="pydoc-calibration", num_samples=16, seq_len=128, seed=0)


def _outlier_inputs(tokens: int, columns: int) -> torch.Tensor:
    """Activations with a few channels 20x larger than the rest, as in real LLMs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, columns, generator=gen)
    x[:, :4] *= 20
    return x


def test_awq_search_error_is_the_output_error_on_the_tokens():
    """The search scores each scale by sum((ΔW H) ∘ ΔW); the winner's score is the mean over
    the tokens of |(Q(W diag s) diag s⁻¹ - W) x|², and it beats plain rounding on inputs with
    outlier channels. With grouped-query v -> o the scale is repeated per query head."""
    args = build_scheme("W4A16", ["Linear"], 32).weights
    gen = torch.Generator().manual_seed(1)
    x = _outlier_inputs(2000, 128)
    hessian = x.T @ x / len(x)
    index = (torch.arange(4).reshape(-1, 1) // 2 * 32 + torch.arange(32)).reshape(-1)
    for mapping in (
        Mapping("norm", ("a", "b"), norm=True),
        Mapping("v", ("o",), norm=False, index=index),
    ):
        weights = [torch.randn(48, 128, generator=gen) * 0.05 for _ in mapping.balance]
        result = search_scale(
            mapping, weights, hessian, x.abs().mean(0), args, "minmax", torch.float32
        )
        assert result.ratio is not None and result.loss < 0.8 * result.loss_rtn
        columns = mapping.expand(result.scale)
        if mapping.index is not None:  # one scale per v channel, shared by its query heads
            assert len(result.scale) == 64 and torch.equal(columns[:32], columns[32:64])
        direct = 0.0
        for w in weights:
            q = rtn_dequantized(w * columns, args, "minmax", None, torch.float32) / columns
            direct += float(((q - w) @ x.T).pow(2).sum(0).mean())
        assert abs(direct - result.loss) < 1e-3 * result.loss


def test_clip_search_lowers_the_output_error():
    args = build_scheme("W4A16", ["Linear"], 32).weights
    x = _outlier_inputs(2000, 128)
    hessian = x.T @ x / len(x)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    weight[:, 100] = 0.5  # an outlier weight column: its groups' ranges are worth clipping
    result = clip_search(weight, hessian, args, "minmax", torch.float32)
    assert result.loss < result.loss_before and result.mean_shrink < 1
    q = rtn_dequantized(result.weight, args, "minmax", None, torch.float32)
    assert abs(float(((q - weight) @ x.T).pow(2).sum(0).mean()) - result.loss) < 1e-3 * result.loss


def _norms(checkpoint) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in checkpoint.glob("*.safetensors"):
        tensors.update({k: v for k, v in load_file(file).items() if "norm" in k})
    return tensors


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_awq_smooths_every_family_and_stays_close(
    family, with_tokenizer, calibration_text, tmp_path
):
    source = with_tokenizer[family]
    out = compress(
        source,
        tmp_path / "awq",
        "W4A16",
        group_size=64,
        method="awq",
        dataset=str(calibration_text),
        progress=False,
        **TINY_CALIBRATION,
    ).output
    report = json.loads((out / "llmpress.json").read_text())["smoothing"]
    assert report["method"] == "awq" and len(report["mappings"]) == 4, report
    sites = report["sites"]
    assert len(sites) == 2 * 4  # two layers, four sites each
    assert all(s["loss"] <= s["loss_rtn"] for s in sites.values())
    assert any(s["loss"] < s["loss_rtn"] for s in sites.values())
    # The norms the attention and MLP read were divided by the chosen scales; the others
    # (Gemma3's post-attention norm, Qwen3's q/k norms) were left alone.
    before, after = _norms(source), _norms(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    smoothed_norms = {
        f"model.layers.{i}.{s.split(' ')[0]}.weight"
        for i in range(2)
        for s in report["mappings"]
        if "norm" in s.split(" ")[0]
    }
    assert changed <= smoothed_norms
    scaled = [k for k, s in sites.items() if "norm" in k and s["ratio"] is not None]
    assert scaled and all(f"{k}.weight" in changed for k in scaled)
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    base = logits(load_transformers(source, decompress=False), ids)
    got = logits(load_transformers(out, decompress=False), ids)
    assert torch.isfinite(got).all()
    assert 0 < relative_error(got, base) < 0.45  # test_families' bound for W4A16


@pytest.mark.parametrize("family", ["gemma3", "llama", "phi3"])
def test_smoothquant_gptq_w8a8_stays_close(family, with_tokenizer, calibration_text, tmp_path):
    source = with_tokenizer[family]
    out = compress(
        source,
        tmp_path / "sq",
        "W8A8",
        method="smoothquant+gptq",
        dataset=str(calibration_text),
        progress=False,
        **TINY_CALIBRATION,
    ).output
    manifest = json.loads((out / "llmpress.json").read_text())
    report = manifest["smoothing"]
    assert report["method"] == "smoothquant" and len(report["mappings"]) == 2  # the norms
    assert all(r["loss"] < r["loss_rtn"] for r in manifest["gptq"].values())
    recipe = (out / "recipe.yaml").read_text()
    assert "SmoothQuantModifier" in recipe and "GPTQModifier" in recipe
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    base = logits(load_transformers(source, decompress=False), ids)
    got = logits(load_transformers(out, decompress=False), ids)
    assert 0 < relative_error(got, base) < 0.15  # test_calibrate_families' FP8 bound


def test_smoothquant_with_static_fp8_scales_of_the_smoothed_inputs(
    with_tokenizer, calibration_text, tmp_path
):
    """FP8 with static input scales: the q/k/v input scale is that of the smoothed input
    (max |x / s| / 448), not of the original one; the model stays close."""
    source = with_tokenizer["llama"]
    runs = {}
    for method in ("rtn", "smoothquant"):
        runs[method] = compress(
            source,
            tmp_path / method,
            "FP8",
            method=method,
            dataset=str(calibration_text),
            progress=False,
            **TINY_CALIBRATION,
        ).output
    plain, smoothed = stored_modules(runs["rtn"]), stored_modules(runs["smoothquant"])
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(plain[q]["input_scale"], smoothed[q]["input_scale"])
    o = "model.layers.0.self_attn.o_proj"  # not smoothed by SmoothQuant: the same input
    assert torch.equal(plain[o]["input_scale"], smoothed[o]["input_scale"])
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    base = logits(load_transformers(source, decompress=False), ids)
    got = logits(load_transformers(runs["smoothquant"], decompress=False), ids)
    assert 0 < relative_error(got, base) < 0.15


@pytest.fixture(scope="module")
def smollm2_awq(smollm2, tmp_path_factory):
    """SmolLM2 at W4A16 (groups of 64), by AWQ and by round-to-nearest."""
    root = tmp_path_factory.mktemp("awq")
    compress(
        str(smollm2),
        str(root / "awq"),
        "W4A16",
        group_size=64,
        method="awq",
        awq_grid=5,  # the search costs the same at any sample count: 4x less than 20
        progress=False,
        **CALIBRATION,
    )
    compress(str(smollm2), str(root / "rtn"), "W4A16", group_size=64, progress=False)
    return root / "awq", root / "rtn"


def _held_out(smollm2) -> torch.Tensor:
    text = load_text("pydoc")[-20_000:]  # held out from the calibration text
    return AutoTokenizer.from_pretrained(smollm2)(text, return_tensors="pt").input_ids[:, :256]


def _nll(model, ids) -> float:
    with torch.inference_mode():
        return float(model(ids, labels=ids).loss)


def test_awq_beats_rtn_on_smollm2_held_out_text(smollm2, smollm2_awq):
    awq, rtn = smollm2_awq
    ids = _held_out(smollm2)
    base = _nll(load_transformers(smollm2, decompress=False), ids)
    got = _nll(load_transformers(awq, decompress=False), ids)
    rounded = _nll(load_transformers(rtn, decompress=False), ids)
    # Perplexity increase over the base: AWQ's is clearly smaller than round-to-nearest's.
    assert got - base < 0.8 * (rounded - base), (base, got, rounded)
    # SmolLM2 uses grouped-query attention (3 KV heads for 9 query heads): v -> o is smoothed
    # with its scales repeated per query head.
    report = json.loads((awq / "llmpress.json").read_text())["smoothing"]
    # In the order of the layer's modules, on every run (the order changes the result).
    assert report["mappings"] == [
        "input_layernorm -> self_attn.q_proj/self_attn.k_proj/self_attn.v_proj",
        "post_attention_layernorm -> mlp.gate_proj/mlp.up_proj",
        "self_attn.v_proj -> self_attn.o_proj",
        "mlp.up_proj -> mlp.down_proj",
    ]
    assert len(report["sites"]) == 30 * 4


def test_smoothquant_shrinks_the_activation_outliers_of_smollm2(smollm2, tmp_path):
    """W8A8's per-token int8 inputs: on held-out text, the largest channel of the q/k/v input
    over the typical one (max / median of each channel's |x| max) is less than half what it
    was (the point of SmoothQuant; measured 2.3-3.6x lower); the model stays close."""
    out = tmp_path / "sq"
    compress(str(smollm2), str(out), "W8A8", method="smoothquant", progress=False, **CALIBRATION)
    base, smoothed = stored_modules(smollm2), stored_modules(out)
    model = load_transformers(smollm2, decompress=False, dtype=torch.float32)
    ids = _held_out(smollm2)
    layers = (0, 15, 29)
    absmax = {}
    hooks = [
        model.model.layers[i].input_layernorm.register_forward_hook(
            lambda module, args, out, i=i: absmax.__setitem__(i, out[0].abs().amax(0))
        )
        for i in layers
    ]
    with torch.inference_mode():
        ref = model(ids[:, :128]).logits
        model(ids)
    for hook in hooks:
        hook.remove()
    for i in layers:
        norm = f"model.layers.{i}.input_layernorm"
        scale = base[norm]["weight"].float() / smoothed[norm]["weight"].float()
        before, after = absmax[i], absmax[i] / scale
        ratio_before = before.max() / before.median()
        ratio_after = after.max() / after.median()
        assert ratio_after < 0.5 * ratio_before, (i, float(ratio_before), float(ratio_after))
    got = logits(load_transformers(out, decompress=False), ids[:, :128])
    assert relative_error(got, ref) < 0.1


def test_wrong_scheme_for_the_method_is_refused(tokenized_llama, tmp_path):
    with pytest.raises(LlmpressError, match="--method awq is for weight-only schemes"):
        compress(str(tokenized_llama), tmp_path / "a", "W8A8", method="awq", **CALIBRATION)
    with pytest.raises(LlmpressError, match="keeps activations unquantized: use --method awq"):
        compress(str(tokenized_llama), tmp_path / "b", "W4A16", method="smoothquant", **CALIBRATION)
    with pytest.raises(LlmpressError, match="--awq-clip searches int weight groups"):
        compress(str(tokenized_llama), tmp_path / "d", "NVFP4A16", method="awq", awq_clip=True)
    with pytest.raises(LlmpressError, match="AWQ searches its scales"):
        compress(str(tokenized_llama), tmp_path / "c", "W4A16", method="awq")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_cli_awq(tokenized_llama, tmp_path):
    out = tmp_path / "out"
    args = ["compress", str(tokenized_llama), "-o", str(out), "--scheme", "W4A16_ASYM"]
    args += ["--group-size", "32", "--method", "awq", "--no-duo-scaling", "--awq-clip", "--quiet"]
    args += ["--dataset", "pydoc-calibration", "--num-samples", "4", "--seq-len", "32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    recipe = (out / "recipe.yaml").read_text()
    assert "AWQModifier" in recipe and "duo_scaling: false" in recipe
    report = json.loads((out / "llmpress.json").read_text())["smoothing"]
    assert len(report["sites"]) == 16 * 4
    # The clipping search: every module but q and k, never worse than no clipping, and it
    # clipped somewhere.
    clip = report["clip"]
    assert len(clip) == 16 * 5 and not any(re.search(r"[qk]_proj$", name) for name in clip)
    assert all(c["loss"] <= c["loss_before"] for c in clip.values())
    assert any(c["mean_shrink"] < 1 and c["loss"] < c["loss_before"] for c in clip.values())
    shown = CliRunner().invoke(cli, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "awq: 64 sites smoothed" in shown.output
    assert "self_attn.v_proj -> self_attn.o_proj" in shown.output
    assert "x round-to-nearest's over all sites" in shown.output
