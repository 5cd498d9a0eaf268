"""GPTQ (`--method gptq`): lower output error than round-to-nearest on real weights, singular
and indefinite Hessians handled, activation-order checkpoints read correctly by transformers."""

from __future__ import annotations

import functools
import json
import re

import compressed_tensors
import pytest
import torch
from click.testing import CliRunner
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from helpers import (
    ct_decompressed_weights,
    layer0_inputs,
    load_transformers,
    logits,
    module_inputs,
    stored_modules,
)
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmpress import compress
from llmpress.algorithms.columns import output_error
from llmpress.algorithms.gptq import GPTQ, Hessian, gptq_quantize
from llmpress.cli import main as cli
from llmpress.errors import LlmpressError
from llmpress.schemes import build_scheme

CALIBRATION = dict(dataset="pydoc-calibration", num_samples=8, seq_len=64, seed=0)
# SmolLM2's down_proj reads 1536 channels: fewer calibration tokens leave its Hessian singular
# and GPTQ's result hinges on the damping (measured: the KL test below passed on one machine
# and missed its bound on another at 512 tokens).
SMOLLM2_CALIBRATION = dict(dataset="pydoc-calibration", num_samples=16, seq_len=128, seed=0)
LAYER0 = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@pytest.fixture(scope="module")
def smollm2_w4(smollm2, tmp_path_factory):
    """SmolLM2 at W4A16 (groups of 64), by GPTQ and by round-to-nearest."""
    root = tmp_path_factory.mktemp("gptq")
    compress(
        str(smollm2),
        str(root / "gptq"),
        "W4A16",
        group_size=64,
        method="gptq",
        progress=False,
        **SMOLLM2_CALIBRATION,
    )
    compress(str(smollm2), str(root / "rtn"), "W4A16", group_size=64, progress=False)
    return root / "gptq", root / "rtn"


def test_gptq_lowers_each_modules_output_error_on_real_weights(smollm2, smollm2_w4):
    gptq, rtn = smollm2_w4
    inputs = layer0_inputs(smollm2, LAYER0, SMOLLM2_CALIBRATION)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).model.layers[0]
    solved, rounded = ct_decompressed_weights(gptq), ct_decompressed_weights(rtn)
    for name in LAYER0:
        full = f"model.layers.0.{name}"
        w = base.get_submodule(name).weight.float()
        x = inputs[name]
        err_gptq = ((solved[full].float() - w) @ x.T).pow(2).mean()
        err_rtn = ((rounded[full].float() - w) @ x.T).pow(2).mean()
        assert err_gptq < 0.7 * err_rtn, (name, float(err_gptq), float(err_rtn))
    # The report in the manifest: every module, every layer, lower than round-to-nearest.
    report = json.loads((gptq / "llmpress.json").read_text())["gptq"]
    assert len(report) == 30 * 7
    assert all(r["loss"] < r["loss_rtn"] and r["damping"] == 0.01 for r in report.values())
    # q/k/v and gate/up were solved together, on one Hessian.
    assert sorted(report["model.layers.3.self_attn.k_proj"]["solved_with"]) == [
        f"model.layers.3.self_attn.{m}_proj" for m in "kqv"
    ]
    recipe = (gptq / "recipe.yaml").read_text()
    assert "GPTQModifier" in recipe and "actorder: static" in recipe


def test_gptq_checkpoint_is_closer_to_the_base_than_rtn(smollm2, smollm2_w4):
    gptq, rtn = smollm2_w4
    from llmpress.corpora import load_text

    text = load_text("pydoc")[-20_000:]  # held out from the calibration text
    ids = AutoTokenizer.from_pretrained(smollm2)(text, return_tensors="pt").input_ids[:, :256]
    base = logits(load_transformers(smollm2, decompress=False), ids)

    def kl(checkpoint):
        got = logits(load_transformers(checkpoint, decompress=False), ids)
        return float(
            torch.nn.functional.kl_div(
                got.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean"
            )
        )

    assert kl(gptq) < 0.8 * kl(rtn)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def test_hessian_is_the_mean_of_x_xt_over_every_batch():
    """Accumulated by upper-triangle panels on the CPU, mirrored: still the whole mean."""
    torch.manual_seed(0)
    batches = [torch.randn(3, 100, 600), torch.randn(1, 37, 600).to(torch.bfloat16)]
    hessian = Hessian(600, "cpu")
    for x in batches:
        hessian.add(x)
    flat = torch.cat([x.reshape(-1, 600).float() for x in batches])
    got = hessian.mean("cpu")
    assert torch.equal(got, got.T)
    assert torch.allclose(got, _hessian(flat), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_propagate_original_solves_on_the_original_models_inputs(dtype, tokenized_llama, tmp_path):
    """One pass per layer: a deep layer's Hessian is that of the plain model's activations,
    computed in the compute dtype, so the reported loss is |ΔW x|² over exactly those inputs.
    In bfloat16 (what a CPU with bf16 units computes in) the Hessian is still exact."""
    out = tmp_path / "one-pass"
    compress(str(tokenized_llama), str(out), "W8A8", method="gptq", propagate="original",
             compute_dtype=dtype, progress=False, **CALIBRATION)  # fmt: skip
    names = ("self_attn.o_proj", "mlp.down_proj")
    inputs = module_inputs(tokenized_llama, names, CALIBRATION, (3, 12), getattr(torch, dtype))
    inputs = {name: x.float() for name, x in inputs.items()}
    plain = AutoModelForCausalLM.from_pretrained(tokenized_llama, dtype=torch.float32)
    report = json.loads((out / "llmpress.json").read_text())["gptq"]
    stored = stored_modules(out)
    for name, x in inputs.items():
        state = stored[name]
        solved = state["weight"].float() * state["weight_scale"].float()
        delta = plain.get_submodule(name).weight.float() - solved
        assert report[name]["loss"] == pytest.approx(output_error(delta, _hessian(x)), rel=1e-3)


def test_dead_input_channels_are_handled():
    torch.manual_seed(0)
    args = build_scheme("W4A16", ["Linear"], 32).weights
    w = torch.randn(64, 128)
    x = torch.randn(512, 128)
    x[:, [3, 40, 77]] = 0  # inputs that never fire: a singular Hessian
    h = _hessian(x)
    result = gptq_quantize(w, h, args, GPTQ.config(actorder="none"))
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, [3, 40, 77]] == 0).all()  # free weights quantize to zero
    assert result.loss < result.loss_rtn
    assert result.damping == 0.01 and not result.notes


def test_an_indefinite_hessian_is_retried_with_more_damping():
    torch.manual_seed(0)
    args = build_scheme("W8A8", ["Linear"]).weights  # int8 per channel
    n = 64
    basis, _ = torch.linalg.qr(torch.randn(n, n))
    eigen = torch.ones(n)
    eigen[-1] = -0.05  # 1 % damping leaves it indefinite, 10 % does not
    h = basis @ torch.diag(eigen) @ basis.T
    result = gptq_quantize(torch.randn(32, n), h, args, GPTQ.config())
    assert result.damping == pytest.approx(0.1)
    assert result.notes and "retrying" in result.notes[0]
    assert torch.isfinite(result.weight).all()


def test_gptq_error_matches_its_definition():
    """The reported loss is mean over tokens of |ΔW x|²."""
    torch.manual_seed(0)
    x, delta = torch.randn(256, 32), torch.randn(8, 32)
    direct = (delta @ x.T).pow(2).sum(0).mean()
    assert output_error(delta, _hessian(x)) == pytest.approx(float(direct), rel=1e-5)


def test_group_actorder_checkpoint_loads_and_matches_its_reference(tokenized_llama, tmp_path):
    """Where the installed compressed-tensors still reads group order (< 0.19), transformers
    loads the checkpoint as its stored ints, scales and g_idx say; from 0.19, which removed
    it, the run is refused before any work, with compressed-tensors' reason."""
    out = tmp_path / "group"
    run = functools.partial(
        compress,
        str(tokenized_llama),
        str(out),
        "W4A16",
        group_size=32,
        method="gptq",
        actorder="group",
        progress=False,
        **CALIBRATION,
    )
    if Version(compressed_tensors.__version__) >= Version("0.19"):
        with pytest.raises(LlmpressError, match="no longer reads group activation order"):
            run()
        assert not out.exists()
        return
    run()
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    # The reference: weights rebuilt from the stored ints, scales and g_idx by hand.
    reference = AutoModelForCausalLM.from_pretrained(tokenized_llama, dtype=torch.float32)
    reordered = 0
    for module, state in stored_modules(out).items():
        if "weight_packed" not in state:
            continue
        g_idx = state["weight_g_idx"].long()
        rows, cols = state["weight_shape"].tolist()
        ints = unpack_from_int32(state["weight_packed"], 4, torch.Size([rows, cols]))
        weight = ints.float() * state["weight_scale"].float()[:, g_idx]
        reference.get_submodule(module).weight.data = weight
        reordered += not torch.equal(g_idx, torch.arange(cols) // 32)
    assert reordered > 50  # activation order changed the groups of most modules
    ids = torch.tensor([list(range(100, 164))])
    want = logits(reference.eval(), ids)
    got = logits(load_transformers(out, decompress=False, dtype=torch.float32), ids)
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


@pytest.mark.parametrize(
    # One scheme per weight path: int groups, int channels, fp8 channels, both fp4 formats.
    # W3A16 and W4AFP8 (int groups again) were dropped to keep the suite under 20 minutes.
    "scheme",
    ["W4A16_ASYM", "W8A8", "FP8_DYNAMIC", "NVFP4A16", "MXFP4A16"],
)
def test_other_schemes_load_close_to_the_base(scheme, tokenized_llama, tmp_path):
    """Int groups and channels, fp8 per channel, and the fp4 formats (through
    compressed-tensors' own quantizer): GPTQ beats round-to-nearest module by module."""
    out = tmp_path / scheme
    group = {"W4A16_ASYM": 32}.get(scheme)
    compress(
        str(tokenized_llama),
        str(out),
        scheme,
        group_size=group,
        method="gptq",
        progress=False,
        **CALIBRATION,
    )
    rtn = tmp_path / f"{scheme}-rtn"
    compress(str(tokenized_llama), str(rtn), scheme, group_size=group, progress=False)
    report = json.loads((out / "llmpress.json").read_text())["gptq"]
    assert all(r["loss"] < r["loss_rtn"] for r in report.values())
    ids = torch.tensor([list(range(100, 164))])
    base = logits(load_transformers(tokenized_llama, decompress=False), ids)
    got = logits(load_transformers(out, decompress=False), ids)
    rounded = logits(load_transformers(rtn, decompress=False), ids)
    assert torch.isfinite(got).all()
    error = float((got - base).norm() / base.norm())
    if scheme not in ("W8A8", "FP8_DYNAMIC"):
        # At 8 bits rounding is near-lossless, and on these arbitrary ids (not text like the
        # calibration's) GPTQ's fp8 was measured 0.113 against RTN's 0.092: only the
        # calibration-input loss above is guaranteed lower there.
        assert error < float((rounded - base).norm() / base.norm()), scheme
    assert error < 0.5


def test_gptq_needs_data_and_int_groups_for_group_order(tokenized_llama, tmp_path):
    with pytest.raises(LlmpressError, match="GPTQ solves the weights"):
        compress(
            str(tokenized_llama),
            str(tmp_path / "a"),
            "W4A16",
            group_size=32,
            method="gptq",
            progress=False,
        )
    with pytest.raises(LlmpressError, match="--actorder group needs int weights in groups"):
        compress(
            str(tokenized_llama),
            str(tmp_path / "b"),
            "FP8_DYNAMIC",
            method="gptq",
            actorder="group",
            progress=False,
            **CALIBRATION,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_gptq_dry_run(tokenized_llama, tmp_path):
    command = ["compress", str(tokenized_llama), "-o", str(tmp_path / "x"), "--scheme", "W4A16",
               "--group-size", "32", "--method", "gptq", "--dataset", "pydoc-calibration",
               "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 0, result.output
    assert "gptq" in result.output and not (tmp_path / "x").exists()
    assert "one pass per layer" not in result.output
    seconds = float(re.search(r"time about ([\d.]+) s", result.output).group(1))
    one_pass = CliRunner().invoke(cli, [*command, "--propagate", "original"])
    assert one_pass.exit_code == 0, one_pass.output
    assert "one pass per layer" in one_pass.output
    assert float(re.search(r"time about ([\d.]+) s", one_pass.output).group(1)) < seconds
