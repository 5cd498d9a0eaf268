"""Recipes in llm-compressor's format: read into the same options as the flags, refused with
the path of the bad key, and the recipe.yaml llmpress writes reloads to the same run."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner
from helpers import stored_modules

from llmpress import compress
from llmpress.api import compress_options
from llmpress.checkpoint import recipe_yaml
from llmpress.cli import main as cli
from llmpress.cli import run
from llmpress.errors import LlmpressError
from llmpress.plan import build_plan
from llmpress.recipe import read_recipe
from llmpress.source import ModelSource

CALIBRATION = dict(dataset="pydoc-calibration", num_samples=4, seq_len=64, seed=0)

# Recipes as published with llm-compressor checkpoints on the hub (their YAML, as written).
PHI3_W4A16 = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      sequential_update: false
      dampening_frac: 0.01
      block_size: 128
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}
"""
ACTORDER_GROUP = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128,
            actorder: group}
          targets: [Linear]
"""
PRESET_BY_TARGETS = """
default_stage:
  default_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
      - [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
    GPTQModifier:
      ignore: ["lm_head", "re:.*down_proj"]
      scheme: {W8A8: ["Linear"]}
      dampening_frac: 0.05
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            PHI3_W4A16,
            dict(scheme="W4A16", method="gptq", targets=("Linear",), ignore=("lm_head",),
                 dampening_frac=0.01, block_size=128, actorder="static"),
        ),
        (ACTORDER_GROUP, dict(scheme="W4A16", method="gptq", actorder="group")),
        (
            PRESET_BY_TARGETS,
            dict(scheme="W8A8", method="smoothquant+gptq", smoothing_strength=0.8,
                 ignore=("lm_head", "re:.*down_proj"), dampening_frac=0.05),
        ),
    ],
)  # fmt: skip
def test_published_recipes_read_as_their_options(text, expected):
    options = compress_options(None, text)
    for key, value in expected.items():
        assert getattr(options, key) == value, key


OPTIONS = [
    dict(scheme="W4A16", group_size=32, method="gptq", actorder="group", dampening_frac=0.05),
    dict(scheme="W4A16_ASYM", group_size=32, method="awq", awq_clip=True, duo_scaling=False,
         awq_grid=10),
    dict(scheme="W8A8", method="smoothquant+gptq", smoothing_strength=0.8,
         ignore=("lm_head", "re:.*down_proj")),
    dict(scheme="FP8", kv_cache="fp8-head", dataset="pydoc-calibration"),
    dict(scheme="NVFP4A16", targets=("re:.*mlp.*",), observer="mse"),
    dict(scheme="W4AFP8", group_size=32, method="gptq", actorder="none", block_size=64),
    dict(scheme="W8A8_STATIC", method="smoothquant", dataset="pydoc-calibration"),
    dict(scheme="FP8_BLOCK"),
]  # fmt: skip


@pytest.mark.parametrize("fields", OPTIONS, ids=lambda f: f"{f['scheme']}-{f.get('method', 'rtn')}")
def test_the_recipe_written_reloads_to_the_same_options(fields, tiny_llama):
    fields = dict(fields)
    options = compress_options(fields.pop("scheme"), **fields)
    text = recipe_yaml(build_plan(ModelSource.open(tiny_llama), options), options)
    dataset = {"dataset": options.dataset} if options.dataset else {}
    assert compress_options(None, text, **dataset) == options


def test_a_recipe_run_equals_the_flags_run(tokenized_llama, tmp_path):
    """--recipe with a GPTQModifier writes the very checkpoint the flags write."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PHI3_W4A16.replace("group_size: 128", "group_size: 32"))
    args = ["--dataset", "pydoc-calibration", "--num-samples", "4", "--seq-len", "64", "--quiet"]
    by_recipe = CliRunner().invoke(
        cli, ["compress", str(tokenized_llama), "-o", str(tmp_path / "r"), "--recipe",
              str(recipe), *args]
    )  # fmt: skip
    assert by_recipe.exit_code == 0, by_recipe.output
    flags = compress(tokenized_llama, tmp_path / "f", "W4A16", group_size=32, method="gptq",
                     progress=False, **CALIBRATION)  # fmt: skip
    got, want = stored_modules(tmp_path / "r"), stored_modules(flags.output)
    assert got.keys() == want.keys()
    assert sum("weight_scale" in state for state in got.values()) == 16 * 7
    for module, state in want.items():
        for key, tensor in state.items():
            assert got[module][key].equal(tensor), (module, key)
    # and the recipe it writes is the one it read, as options
    assert compress_options(None, tmp_path / "r" / "recipe.yaml", dataset="pydoc-calibration") == (
        compress_options(None, recipe, dataset="pydoc-calibration")
    )


BAD = [
    ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n      damping: 0.1",
     "quant_stage.quant_modifiers.GPTQModifier.damping: unknown key for GPTQModifier"),
    ("quant_stage:\n  quant_modifiers:\n    QuantModifier:\n      scheme: W4A16",
     "quant_stage.quant_modifiers.QuantModifier: unknown modifier 'QuantModifier'"),
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: W5A5",
     "quant_stage.quant_modifiers.QuantizationModifier.scheme: unknown scheme 'W5A5'"),
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]",
     "give the scheme as `scheme`"),
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n"
     "      scheme: {W4A16: [re:.*self_attn.*], W5A5: [re:.*mlp.*]}",
     "QuantizationModifier.scheme.W5A5: unknown scheme 'W5A5'"),
    ("quant_stage:\n  quant_modifiers:\n    AWQModifier: {n_grid: 10}",
     "needs exactly one QuantizationModifier or GPTQModifier"),
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      config_groups:\n"
     "        group_0: {targets: [Linear], weights: {num_bits: 4, type: int, strategy: group, "
     "group_size: 128, symmetric: true, block_structure: [1, 2, 3]}}",
     "config_groups.group_0.weights.block_structure: Value error"),
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      config_groups:\n"
     "        group_0: {targets: [Linear], weights: {num_bits: 6, type: float, strategy: tensor}}",
     "config_groups.group_0: Only num_bits in (8) are supported"),
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      config_groups:\n"
     "        a: {targets: [re:.*mlp.*], weights: {num_bits: 4, type: int, observer: mse}}\n"
     "        b: {targets: [re:.*attn.*], weights: {num_bits: 8, type: int, observer: minmax}}",
     "the groups' weight observers differ"),
    ("quant_stage: [GPTQModifier]", "a recipe's top level holds stages"),
    ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n  :", "not valid YAML"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_recipes_are_refused_naming_the_bad_key(text, message):
    with pytest.raises(LlmpressError) as raised:
        read_recipe(text)
    assert message in str(raised.value)


def test_cli_refuses_a_recipe_beside_conflicting_flags_and_writes_nothing(
    tiny_llama, tmp_path, monkeypatch, capsys
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(PHI3_W4A16)
    out = tmp_path / "out"
    base = ["llmpress", "compress", str(tiny_llama), "-o", str(out)]
    for extra, message in (
        (["--recipe", str(recipe), "--scheme", "W8A16"], "give a scheme or a recipe, not both"),
        (["--recipe", str(recipe), "--dampening-frac", "0.1"],
         "--dampening-frac is set by the recipe too; drop one of the two"),
        (["--recipe", str(tmp_path / "missing.yaml")], "missing.yaml not found"),
        ([], "give a scheme (e.g. W4A16"),
    ):  # fmt: skip
        monkeypatch.setattr(sys, "argv", [*base, *extra])
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
