"""Pruning: SparseGPT, Wanda and magnitude, alone or with quantization in the same run, read
back by transformers, compressed-tensors and `llmpress inspect`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import preset_name_to_scheme
from helpers import layer0_inputs, load_transformers, relative_error, stored_modules
from safetensors.torch import load_file, save_file
from test_smollm2 import perplexity
from transformers import AutoTokenizer

from llmpress import compress
from llmpress.algorithms.gptq import GPTQ, gptq_quantize
from llmpress.algorithms.magnitude import magnitude_mask
from llmpress.algorithms.sparsegpt import Pruning
from llmpress.algorithms.wanda import wanda_mask
from llmpress.api import compress_options
from llmpress.checkpoint import recipe_yaml
from llmpress.errors import LlmpressError
from llmpress.plan import build_plan
from llmpress.source import ModelSource
from llmpress.sparsity import Structure, n_m_violations, zero_fraction

CALIBRATION = dict(dataset="pydoc-calibration", num_samples=8, seq_len=64)
TWO_FOUR = Structure(2, 4)


def pruned_weights(model) -> dict[str, torch.Tensor]:
    """The decoder layers' Linear weights of a loaded model, in float32."""
    return {
        name: module.weight.detach().float()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }


def manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "llmpress.json").read_text())


# --- the masks -------------------------------------------------------------------------------


def test_masks_prune_an_exact_count_in_their_structure():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    weight[0, :40] = 0  # ties at zero must not push the count over the target
    mask = magnitude_mask(weight, 0.3, Structure())
    assert int(mask.sum()) == int(weight.numel() * 0.3)
    assert weight.abs()[mask].max() <= weight.abs()[~mask].min()

    norms = torch.rand(128) * 10
    mask = wanda_mask(weight, norms, 0.5, Structure())
    assert (mask.sum(dim=1) == 64).all()  # per output row, as the paper compares
    scores = weight.abs() * norms
    for row in range(64):
        assert scores[row][mask[row]].max() <= scores[row][~mask[row]].min()

    for mask in (magnitude_mask(weight, 0.5, TWO_FOUR), wanda_mask(weight, norms, 0.5, TWO_FOUR)):
        blocks = mask.reshape(64, 32, 4)
        assert (blocks.sum(dim=2) == 2).all()
        assert n_m_violations(weight.masked_fill(mask, 0), TWO_FOUR) == 0


def test_n_m_violations_count_blocks_with_too_few_zeros():
    weight = torch.ones(2, 8)
    weight[:, ::2] = 0
    assert n_m_violations(weight, TWO_FOUR) == 0
    weight[1, 4] = 3.0
    assert n_m_violations(weight, TWO_FOUR) == 1
    assert n_m_violations(weight, Structure()) == 0


@pytest.mark.parametrize("text", ["3:2", "0:4", "2-4", "half"])
def test_bad_masks_are_refused(text):
    with pytest.raises(ValueError, match="N:M"):
        Structure.parse(text)


# --- the solve -------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", [Structure(), TWO_FOUR], ids=lambda s: s.label)
@pytest.mark.parametrize("scheme", [None, "W4A16", "FP8_DYNAMIC"])
def test_sparsegpt_beats_magnitude_on_its_inputs_and_keeps_each_budget(structure, scheme):
    """On correlated inputs of unequal channels (as a model's are), SparseGPT's output error
    is a fraction of magnitude pruning's (then round to nearest: 0.05-0.25 measured); stacked
    modules each keep their own sparsity."""
    torch.manual_seed(0)
    x = torch.randn(4096, 32) @ torch.randn(32, 256) + 0.3 * torch.randn(4096, 256)
    x = x * torch.linspace(0.2, 2, 256)
    hessian = x.t() @ x / x.shape[0]
    weight = torch.randn(192, 256)
    args = preset_name_to_scheme(scheme, ["Linear"]).weights if scheme else None
    rows = (slice(0, 128), slice(128, 192))
    result = gptq_quantize(
        weight, hessian, args, GPTQ.config(), prune=Pruning(structure, 0.5, rows)
    )
    assert result.loss < 0.5 * result.loss_rtn
    for part in rows:
        assert zero_fraction(result.weight[part]) >= 0.5
        if args is None:
            assert zero_fraction(result.weight[part]) == 0.5
    assert n_m_violations(result.weight, structure) == 0


def test_a_fixed_mask_is_kept_and_its_removals_compensated():
    torch.manual_seed(1)
    x = torch.randn(2048, 128) * torch.linspace(0.1, 3, 128)
    hessian = x.t() @ x / x.shape[0]
    weight = torch.randn(64, 128)
    mask = magnitude_mask(weight, 0.5, Structure())
    result = gptq_quantize(
        weight, hessian, None, GPTQ.config(), prune=Pruning(Structure(), 0.5, fixed=mask)
    )
    assert (result.weight[mask] == 0).all() and zero_fraction(result.weight) == 0.5
    assert result.loss < result.loss_rtn  # the survivors moved to make up for the removals
    assert not torch.equal(result.weight[~mask], weight[~mask])


# --- whole runs ------------------------------------------------------------------------------

RUNS = {
    "sparsegpt-2:4": dict(method="sparsegpt", mask="2:4"),
    "sparsegpt-unstructured-0.6": dict(method="sparsegpt", sparsity=0.6),
    "wanda-2:4": dict(method="wanda", mask="2:4"),
    "wanda-2:4-two-passes": dict(method="wanda", mask="2:4", propagate="compressed"),
    "magnitude-0.5": dict(method="magnitude"),
    "sparsegpt-2:4-FP8_DYNAMIC": dict(method="sparsegpt", mask="2:4", scheme="FP8_DYNAMIC"),
    "sparsegpt+gptq-2:4-W4A16": dict(
        method="sparsegpt+gptq", mask="2:4", scheme="W4A16", group_size=64
    ),
    "wanda+gptq-2:4-W8A8": dict(method="wanda+gptq", mask="2:4", scheme="W8A8"),
    "magnitude-2:4-W4A16_ASYM": dict(method="magnitude", mask="2:4", scheme="W4A16_ASYM"),
}


@pytest.fixture(scope="module")
def runs(with_tokenizer, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sparse")
    model = with_tokenizer["llama"]
    out = {}
    for name, kwargs in RUNS.items():
        data = CALIBRATION if not kwargs["method"].startswith("magnitude") else {}
        out[name] = compress(model, root / name, progress=False, **data, **kwargs).output
    return out


@pytest.mark.parametrize("name", RUNS)
def test_the_structure_holds_after_save_and_reload(name, runs):
    """transformers loads every run (quantized ones decompressed); each pruned weight has its
    target's zeros, the 2:4 pattern holds exactly in every row, and the manifest says so."""
    checkpoint = runs[name]
    kwargs = RUNS[name]
    quantized = "scheme" in kwargs
    model = load_transformers(checkpoint, decompress=quantized, dtype=torch.float32)
    weights = pruned_weights(model)
    assert len(weights) == 14
    structure = Structure.parse(kwargs.get("mask", "unstructured"))
    target = structure.sparsity if structure.structured else kwargs.get("sparsity", 0.5)
    recorded = manifest(checkpoint)["sparsity"]
    assert recorded["structure"] == structure.label
    assert set(recorded["modules"]) == set(weights)
    for module, weight in weights.items():
        assert n_m_violations(weight, structure) == 0, module
        achieved = zero_fraction(weight)
        # Quantization may round a few more small weights to zero, never fewer; SparseGPT
        # prunes int(columns x sparsity) of each block of 128 columns.
        assert target - 1e-3 <= achieved <= target + (0.01 if quantized else 1e-6), module
        assert recorded["modules"][module]["achieved"] == pytest.approx(achieved, abs=1e-6)
    config = json.loads((checkpoint / "config.json").read_text())
    if quantized:
        sparsity_config = config["quantization_config"]["sparsity_config"]
        assert sparsity_config["format"] == "dense"
        assert sparsity_config["sparsity_structure"] == structure.label
        assert sparsity_config["global_sparsity"] == recorded["global_sparsity"]
        assert not sparsity_config["targets"]  # vLLM 0.32 refuses sparsity targets
    else:  # a plain dense model
        assert "quantization_config" not in config


def test_compressed_tensors_reads_the_same_sparse_weights_as_transformers(runs):
    checkpoint = runs["sparsegpt+gptq-2:4-W4A16"]
    from llmpress.served import dequantized_weight

    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    scheme.weights.group_size = 64
    model = pruned_weights(load_transformers(checkpoint, dtype=torch.float32))
    for module, state in stored_modules(checkpoint).items():
        if "weight_packed" in state:
            weight = dequantized_weight(state, scheme, torch.float32)
            assert torch.equal(weight == 0, model[module] == 0), module
            assert relative_error(weight, model[module]) < 1e-2, module
            assert n_m_violations(weight, TWO_FOUR) == 0


def test_sparsegpt_then_quantization_is_below_magnitude_and_rtn(runs):
    """SparseGPT's pruning (then GPTQ on the same Hessian, for sparsegpt+gptq): each module's
    output error on the calibration inputs is below magnitude pruning's (then round to
    nearest), for every module; without +gptq the pruned weights are rounded to nearest, as
    llm-compressor's SparseGPTModifier then QuantizationModifier do."""
    report = manifest(runs["sparsegpt+gptq-2:4-W4A16"])["gptq"]
    assert len(report) == 14
    for module, entry in report.items():
        assert entry["loss"] < entry["loss_magnitude"], module
    checkpoint = manifest(runs["sparsegpt-2:4-FP8_DYNAMIC"])
    assert "gptq" not in checkpoint and len(checkpoint["sparsegpt"]) == 14
    for module, entry in checkpoint["sparsegpt"].items():
        assert entry["loss"] < entry["loss_magnitude"], module


def test_magnitude_pruning_is_exactly_the_smallest_weights(with_tokenizer, runs):
    original = load_file(with_tokenizer["llama"] / "model.safetensors")
    stored = stored_modules(runs["magnitude-0.5"])
    for module, state in stored.items():
        if ".layers." not in module or "weight" not in state or state["weight"].ndim != 2:
            continue
        expected = original[f"{module}.weight"]
        expected = expected.masked_fill(magnitude_mask(expected, 0.5, Structure()), 0)
        assert torch.equal(state["weight"], expected), module


@pytest.mark.parametrize(
    "run, reference",
    [
        # One pass (the default): each module pruned on what it sees in the pruned model,
        # its predecessors in the layer pruned already.
        ("wanda-2:4", "output"),
        # Two passes: the whole layer observed before any module is pruned.
        ("wanda-2:4-two-passes", "input"),
    ],
)
def test_wanda_prunes_by_the_norms_of_the_real_inputs(with_tokenizer, runs, run, reference):
    """Layer 0's Wanda masks are those of |W| times the inputs' norms, recomputed here from
    transformers' own forward of the calibration samples through the original model, or
    through the pruned one as written."""
    model = with_tokenizer["llama"]
    original = load_file(model / "model.safetensors")
    stored = stored_modules(runs[run])
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    inputs = layer0_inputs(runs[run] if reference == "output" else model, names, CALIBRATION)
    for name in names:
        module = f"model.layers.0.{name}"
        weight = original[f"{module}.weight"]
        norms = inputs[name].square().mean(dim=0).sqrt()
        mask = wanda_mask(weight, norms, 0.5, TWO_FOUR)
        kept = stored[module]["weight"] != 0
        # Equal up to near-ties in the scores (bf16 inputs summed in another order).
        assert (kept == ~mask).float().mean() > 0.99, name


def test_one_pass_and_two_passes_prune_differently_past_the_first_modules(runs):
    """The one-pass default is not the two-pass run under another name: o_proj onwards see
    pruned inputs there, so some of their masks differ; q/k/v read the same inputs in both."""
    one, two = stored_modules(runs["wanda-2:4"]), stored_modules(runs["wanda-2:4-two-passes"])
    prefix = "model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        assert torch.equal(one[prefix + name]["weight"] != 0, two[prefix + name]["weight"] != 0)
    assert not torch.equal(
        one[prefix + "mlp.down_proj"]["weight"] != 0, two[prefix + "mlp.down_proj"]["weight"] != 0
    )


def test_per_layer_sparsities(with_tokenizer, tmp_path):
    out = compress(
        with_tokenizer["llama"],
        tmp_path / "layers",
        method="sparsegpt",
        sparsity=[0.25, 0.75],
        progress=False,
        **CALIBRATION,
    ).output
    for module, entry in manifest(out)["sparsity"]["modules"].items():
        expected = 0.25 if ".layers.0." in module else 0.75
        assert entry["target"] == expected
        assert entry["achieved"] == pytest.approx(expected, abs=1e-3), module


def test_a_sparsity_list_per_targeted_module_as_llm_compressor_reads_it(tiny_llama):
    """llm-compressor 0.14 indexes the list by every module its targets match (lm_head too),
    in model order; llmpress prunes inside the decoder layers, each by its own entry."""
    source = ModelSource.open(tiny_llama)
    linears = [n for n, m in source.modules.items() if isinstance(m, torch.nn.Linear)]
    values = [round(0.1 + 0.02 * i, 2) for i in range(len(linears))]  # 15: 14 + lm_head
    options = compress_options(None, method="magnitude", sparsity=values)
    modules = build_plan(source, options).sparsity.modules
    assert len(modules) == 14 and "lm_head" not in modules
    for name, target in modules.items():
        assert target == values[linears.index(name)]


def test_sparsity_targets_differ_from_the_quantized_ones(with_tokenizer, tmp_path):
    """Prune the MLPs only, quantize everything: attention stays dense, the MLPs are 2:4."""
    out = compress(
        with_tokenizer["llama"],
        tmp_path / "mlp",
        "FP8_DYNAMIC",
        method="sparsegpt",
        mask="2:4",
        sparsity_targets=["re:.*mlp.*"],
        progress=False,
        **CALIBRATION,
    ).output
    weights = pruned_weights(load_transformers(out, dtype=torch.float32))
    assert set(manifest(out)["sparsity"]["modules"]) == {n for n in weights if ".mlp." in n}
    for module, weight in weights.items():
        sparse = n_m_violations(weight, TWO_FOUR) == 0
        assert sparse == (".mlp." in module), module
    # SparseGPT solved the pruned modules; everything was then rounded to nearest.
    assert set(manifest(out)["sparsegpt"]) == set(manifest(out)["sparsity"]["modules"])


# --- recipes ---------------------------------------------------------------------------------

SPARSE_FP8 = """
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["Linear"]
      ignore: ["re:.*lm_head"]
quantization_stage:
  quantization_modifiers:
    QuantizationModifier:
      targets: ["Linear"]
      ignore: ["lm_head"]
      scheme: "FP8_DYNAMIC"
"""


def test_llm_compressors_2_4_fp8_recipe_reads_as_its_options():
    options = compress_options(None, SPARSE_FP8)
    assert options == compress_options(
        "FP8_DYNAMIC",
        method="sparsegpt",
        mask="2:4",
        sparsity=0.5,
        sparsity_targets=["Linear"],
        sparsity_ignore=["re:.*lm_head"],
    )


@pytest.mark.parametrize(
    "recipe, expected",
    [
        (
            "s_stage: {m_modifiers: {WandaPruningModifier: {sparsity: [0.4, 0.6]}}}",
            dict(prune="wanda", sparsity=(0.4, 0.6), mask="unstructured", scheme=None),
        ),
        (
            "s_stage: {m_modifiers: {MagnitudePruningModifier: {targets: [Linear], "
            "init_sparsity: 0.05, final_sparsity: 0.7, start: 0, end: 5, "
            "mask_structure: unstructured}}}",
            dict(prune="magnitude", sparsity=0.7, sparsity_targets=("Linear",)),
        ),
        (
            "s_stage: {m_modifiers: {SparseGPTModifier: {mask_structure: '0:0', "
            "block_size: 64}}}\nq_stage: {q_modifiers: {GPTQModifier: {scheme: W4A16, "
            "block_size: 64}}}",
            dict(prune="sparsegpt", mask="unstructured", method="gptq", block_size=64),
        ),
    ],
)
def test_pruning_recipes_read_as_their_options(recipe, expected):
    options = compress_options(None, recipe, dataset="pydoc-calibration")
    for key, value in expected.items():
        assert getattr(options, key) == value, key


@pytest.mark.parametrize(
    "recipe, message",
    [
        (
            "s_stage: {m: {SparseGPTModifier: {sparsity_profile: owl, owl_m: 5, owl_lmbda: 0.1}}}",
            "sparsity_profile: OWL",
        ),
        (
            "s_stage: {m_modifiers: {SparseGPTModifier: {}, WandaPruningModifier: {}}}",
            "one pruning modifier",
        ),
        ("s_stage: {m_modifiers: {SparseGPTModifier: {sparsty: 0.5}}}", "sparsty: unknown key"),
        (
            "s_stage: {m_modifiers: {SparseGPTModifier: {block_size: 64}, "
            "GPTQModifier: {scheme: W4A16, block_size: 128}}}",
            "share one solve",
        ),
        (
            "s_stage: {m_modifiers: {SparseGPTModifier: {preserve_sparsity_mask: true}}}",
            "existing mask",
        ),
    ],
)
def test_bad_pruning_recipes_are_refused(recipe, message):
    recipe = recipe.replace("{m: {", "{m_modifiers: {")
    with pytest.raises(LlmpressError, match=message):
        compress_options(None, recipe)


@pytest.mark.parametrize(
    "fields",
    [
        dict(scheme="FP8_DYNAMIC", method="sparsegpt", mask="2:4"),
        dict(scheme=None, method="wanda", sparsity=[0.3, 0.4]),
        dict(scheme=None, method="magnitude", sparsity=0.6, sparsity_ignore=["re:.*o_proj"]),
        dict(scheme="W8A8", method="wanda+gptq", mask="2:4", block_size=64),
    ],
    ids=["sparsegpt-fp8", "wanda", "magnitude", "wanda+gptq"],
)
def test_the_pruning_recipe_written_reloads_to_the_same_options(fields, tiny_llama):
    fields = dict(fields)
    options = compress_options(fields.pop("scheme"), **fields, dataset="pydoc-calibration")
    text = recipe_yaml(build_plan(ModelSource.open(tiny_llama), options), options)
    again = compress_options(None, text, dataset="pydoc-calibration")
    # The recipe spells the defaults out (targets, ignore); the run they make is the same.
    plan, plan_again = (build_plan(ModelSource.open(tiny_llama), o) for o in (options, again))
    assert plan_again.sparsity == plan.sparsity
    assert [g.modules for g in plan_again.groups] == [g.modules for g in plan.groups]
    assert (again.prune, again.method, again.block_size) == (
        options.prune,
        options.method,
        options.block_size,
    )


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="sparsegpt", mask="2:4", sparsity=0.7), "prunes exactly 0.5"),
        (dict(method="sparsegpt", sparsity=1.5), "not a fraction"),
        (dict(method="sparsegpt", mask="4:3"), "N:M"),
        (dict(scheme="W4A16", method="gptq", sparsity=0.5), "need a pruning method"),
        (dict(method="sparsegpt", sparsity=[0.5, 0.5, 0.5]), r"3 sparsities given.*\(2\)"),
        (dict(method="sparsegpt", mask="1:3", block_size=126), "do not tile"),
        (dict(method="wanda", dataset=None), "Wanda prunes by the norms"),
        (dict(method="sparsegpt", dataset=None), "SparseGPT prunes by the Hessians"),
        (dict(scheme="W4A16", method="awq", sparsity=0.5), "need a pruning method"),
        (dict(method="sparsegpt", sparsity_targets=["re:.*nothing.*"]), "matches no Linear"),
    ],
)
def test_bad_pruning_runs_fail_before_writing(kwargs, message, with_tokenizer, tmp_path):
    kwargs = {"dataset": "pydoc-calibration", **kwargs}
    out = tmp_path / "out"
    with pytest.raises(LlmpressError, match=message):
        compress(with_tokenizer["llama"], out, progress=False, **kwargs)
    assert not out.exists()


# --- inspect ---------------------------------------------------------------------------------


def llmpress(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmpress.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize("name", ["sparsegpt-2:4-FP8_DYNAMIC", "sparsegpt-2:4"])
def test_inspect_verifies_the_pattern_and_finds_a_broken_one(name, runs, tmp_path):
    info = json.loads(llmpress("inspect", runs[name], "--json").stdout)["sparsity"]
    assert info["pattern_holds"] is True and info["modules"] == 14
    assert info["global_sparsity"] == pytest.approx(info["recorded_global_sparsity"], abs=1e-6)
    assert "2:4 pattern: holds in every pruned weight" in llmpress("inspect", runs[name]).stdout

    broken = tmp_path / "broken"
    shutil.copytree(runs[name], broken)
    tensors = load_file(broken / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    bits = tensors[key].view(torch.uint8 if tensors[key].element_size() == 1 else torch.int16)
    row = bits[3]
    zero, nonzero = (row == 0).nonzero()[0, 0], (row != 0).nonzero()[0, 0]
    row[zero] = row[nonzero]  # one pruned weight of one row made nonzero
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    proc = llmpress("inspect", broken)
    assert proc.returncode == 2, proc.stdout
    assert "does not hold in 1 pruned weights (first: model.layers.1.mlp.up_proj)" in proc.stderr


def test_cli_prunes_and_quantizes_in_one_run(with_tokenizer, tmp_path):
    out = tmp_path / "cli"
    proc = llmpress(
        "compress", with_tokenizer["llama"], "-o", out, "--method", "sparsegpt", "--mask", "2:4",
        "--scheme", "FP8_DYNAMIC", "--dataset", "pydoc-calibration", "--num-samples", "4",
        "--seq-len", "64", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "14 layers quantized, 14 pruned (2:4, 50.0% zeros)" in proc.stdout
    recipe = (out / "recipe.yaml").read_text()
    assert "SparseGPTModifier" in recipe and "QuantizationModifier" in recipe
    plan = llmpress(
        "compress", with_tokenizer["llama"], "-o", tmp_path / "dry", "--method", "wanda",
        "--sparsity", "0.3,0.4", "--dataset", "pydoc-calibration", "--dry-run",
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert "pruned: 14 modules" in plan.stdout and not (tmp_path / "dry").exists()


# --- quality on the real model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pruned(smollm2, tmp_path_factory) -> dict[str, float]:
    """SmolLM2-135M pruned 2:4 by each method on the same small calibration set, and the
    perplexity of each on held-out text."""
    root = tmp_path_factory.mktemp("smollm2-sparse")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    data = dict(dataset="pydoc-calibration", num_samples=16, seq_len=256)
    ppl = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        out = compress(
            smollm2, root / method, method=method, mask="2:4", progress=False, **data
        ).output
        model = load_transformers(out, decompress=False, dtype=torch.float32)
        ppl[method] = perplexity(model, tokenizer)
        shutil.rmtree(out)
    return ppl


def test_on_smollm2_sparsegpt_and_wanda_beat_magnitude_at_2_4(smollm2_pruned):
    ppl = smollm2_pruned
    assert all(math.isfinite(v) for v in ppl.values()), ppl
    assert ppl["sparsegpt"] < 0.8 * ppl["magnitude"], ppl
    assert ppl["wanda"] < ppl["magnitude"], ppl


def test_pruned_layers_propagate_their_pruned_outputs_by_default(with_tokenizer):
    """Each layer calibrates on the outputs of the pruned layers before it, as in
    llm-compressor's sequential pipeline, and each module on those of the pruned modules
    before it in its layer, in one pass per layer; `--propagate compressed` gives two passes
    (the whole layer observed first), `--propagate original` one pass on the original model's
    activations. Smoothing and the KV cache need the whole layer observed: two passes."""
    from llmpress.estimate import dry_run
    from llmpress.stages import stages_of

    model = with_tokenizer["llama"]
    for scheme in (None, "FP8_DYNAMIC"):
        options = compress_options(scheme, method="sparsegpt", dataset="pydoc-calibration")
        plan = build_plan(ModelSource.open(model), options)
        (stage,) = stages_of(plan, options.independent, options.propagate)
        assert stage.sequential and not stage.one_pass
        assert dry_run(model, options)["calibration"]["propagate"] == "sequential"
        (stage,) = stages_of(plan, False, "compressed")
        assert not stage.sequential and not stage.one_pass
        (stage,) = stages_of(plan, False, "original")
        assert stage.one_pass and not stage.sequential
    options = compress_options(
        "FP8_DYNAMIC", method="sparsegpt", kv_cache="fp8", dataset="pydoc-calibration"
    )
    assert dry_run(model, options)["calibration"]["propagate"] == "compressed"
    plan = build_plan(ModelSource.open(model), options)
    with pytest.raises(LlmpressError, match="--kv-cache need a whole layer observed first"):
        stages_of(plan, False, "sequential")
