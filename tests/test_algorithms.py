"""Algorithms are peers behind one interface (llmpress.algorithms): the registry, the `--method`
parser, and the worked example of docs/architecture.md kept true: an algorithm declared and
registered here, in this file alone, runs through the CLI."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from llmpress.algorithms import (
    ALGORITHMS,
    Need,
    Role,
    method_choices,
    parse_method,
    register,
)
from llmpress.algorithms.base import Pruner, Quantizer
from llmpress.cli import main
from llmpress.errors import LlmpressError

SRC = Path(__file__).resolve().parents[1] / "src" / "llmpress"


# The worked example: one declaration and one registry line.
@dataclass(frozen=True, kw_only=True)
class LastColumns(Pruner):
    """Prunes the last `sparsity` share of every weight's input columns."""

    def mask(self, weight, input_norms, sparsity, structure):  # noqa: ANN001, ANN201
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[:, weight.shape[1] - int(weight.shape[1] * sparsity) :] = True
        return mask


LAST_COLUMNS = LastColumns(
    name="last-columns",
    modifier="LastColumnsPruningModifier",
    needs=Need.NOTHING,
    summary="prune the last input columns (a test's algorithm)",
    options=("sparsity",),
)


# A quantizer is added the same way: its `quantize` works on the resident layer (a
# LayerContext), with what it declared it needs observed, and writes its manifest section.
@dataclass(frozen=True, kw_only=True)
class TracedRounding(Quantizer):
    """Rounds to nearest, and records the trace of each module's input Hessian."""

    def quantize(self, ctx, weights, scheme, masks):  # noqa: ANN001, ANN201
        for name in weights:
            trace = float(ctx.watch.hessians[name].mean(ctx.device).trace())
            ctx.record(self.manifest, name, {"hessian_trace": trace})
        return ALGORITHMS["rtn"].quantize(ctx, weights, scheme, masks)


TRACED = TracedRounding(
    name="traced-rtn",
    modifier="QuantizationModifier",
    needs=Need.HESSIAN,
    summary="round to nearest, recording the inputs' Hessian (a test's algorithm)",
    needs_data="traced-rtn records the Hessians of the layers' inputs",
    manifest="traced_rtn",
)


@pytest.fixture(scope="module")
def registered():
    """This file's algorithms in the registry, for its tests only."""
    for algorithm in (LAST_COLUMNS, TRACED):
        register(algorithm)
    yield
    for algorithm in (LAST_COLUMNS, TRACED):
        del ALGORITHMS[algorithm.name]


def _compress(model: Path, out: Path, *args: str) -> None:
    done = CliRunner().invoke(main, ["compress", str(model), "-o", str(out), *args, "--quiet"])
    assert done.exit_code == 0, done.output


def test_a_quantizer_registered_in_one_file_observes_and_reports_through_the_cli(
    registered, tokenized_llama, tmp_path
):
    """It gets the Hessians it asked for, its manifest section is written, and its weights
    are round-to-nearest's, byte for byte."""
    common = ["--scheme", "W4A16", "--dataset", "pydoc-calibration", "--num-samples", "4",
              "--seq-len", "32"]  # fmt: skip
    outs = {method: tmp_path / method for method in ("traced-rtn", "rtn")}
    for method, out in outs.items():
        _compress(tokenized_llama, out, "--method", method, *common)
    manifest = json.loads((outs["traced-rtn"] / "llmpress.json").read_text())
    traces = manifest["traced_rtn"]
    assert len(traces) == 16 * 7  # every Linear of the 16 decoder layers
    assert all(entry["hessian_trace"] > 0 for entry in traces.values())
    for shard in outs["rtn"].glob("*.safetensors"):
        assert (outs["traced-rtn"] / shard.name).read_bytes() == shard.read_bytes()


def test_an_algorithm_registered_in_one_file_runs_through_the_cli(registered, tiny_llama, tmp_path):
    out = tmp_path / "pruned"
    _compress(tiny_llama, out, "--method", "last-columns", "--sparsity", "0.25")
    source, written = load_file(tiny_llama / "model.safetensors"), {}
    for shard in out.glob("*.safetensors"):
        written |= load_file(shard)
    pruned = [k for k in written if ".layers." in k and k.endswith("proj.weight")]
    assert len(pruned) == 2 * 7  # every Linear of both decoder layers
    for key in pruned:
        cut = source[key].shape[1] * 3 // 4
        assert torch.equal(written[key][:, :cut], source[key][:, :cut])
        assert not written[key][:, cut:].any()
    assert torch.equal(written["lm_head.weight"], source["lm_head.weight"])  # ignored
    assert "LastColumnsPruningModifier" in (out / "recipe.yaml").read_text()


def test_every_algorithm_declares_a_role_a_modifier_and_what_it_needs():
    for name, algorithm in ALGORITHMS.items():
        assert algorithm.name == name and "+" not in name
        assert isinstance(algorithm.role, Role) and isinstance(algorithm.needs, Need)
        assert algorithm.modifier.endswith("Modifier")
        # What needs observed inputs needs calibration text, and says why.
        assert (algorithm.needs == Need.NOTHING) == (algorithm.needs_data is None), name


def test_methods_join_in_role_order_and_unknown_names_list_the_known():
    method = parse_method("sparsegpt+gptq")
    assert [a.name for a in method.algorithms] == ["sparsegpt", "gptq"]
    assert method.quantizing == "gptq" and parse_method("wanda").rounding.name == "rtn"
    with pytest.raises(LlmpressError, match="in that order"):
        parse_method("gptq+smoothquant")
    with pytest.raises(LlmpressError, match="rounds the weights it smooths itself"):
        parse_method("awq+gptq")
    with pytest.raises(LlmpressError, match="unknown method 'gtpq'.*known: rtn, gptq"):
        parse_method("gtpq")
    assert {"rtn", "gptq", "awq", "smoothquant+gptq", "wanda+gptq"} <= set(method_choices())


def test_no_algorithm_name_is_compared_outside_the_registry():
    """Adding an algorithm must not mean editing the loop, the planner or the writer."""
    names = "|".join(re.escape(n) for n in ALGORITHMS)
    compared = re.compile(
        rf"""[=!]=\s*["']({names})["']|["']({names})["']\s*[=!]=|in \(["']({names})["']"""
    )
    found = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in SRC.rglob("*.py")
        if "algorithms" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if compared.search(line)
    ]
    assert not found, found


def test_each_algorithm_has_a_frozen_config_of_its_options_from_the_one_table():
    from pydantic import ValidationError

    from llmpress.api import compress_options

    options = compress_options("W4A16", method="gptq", block_size=64, dataset="pydoc-calibration")
    config = ALGORITHMS["gptq"].config(options)
    assert config.model_dump() == dict(
        block_size=64, dampening_frac=0.01, actorder="static", offload_hessians=False
    )
    with pytest.raises(ValidationError):  # frozen
        config.block_size = 32
    with pytest.raises(ValidationError):  # the table's constraint (gt=0), not a copy of it
        type(config)(block_size=0)
    for algorithm in ALGORITHMS.values():  # every option an algorithm owns is in the table
        assert set(algorithm.config(options).model_dump()) == set(algorithm.options)
    # The run's nested view: one config per algorithm it runs; defaults are the table's.
    pruned = compress_options("W8A8", method="sparsegpt+gptq", dataset="pydoc-calibration")
    nested = pruned.algorithm_configs
    assert list(nested) == ["sparsegpt", "gptq"]
    assert nested["sparsegpt"].dampening_frac == nested["gptq"].dampening_frac == 0.01
    assert ALGORITHMS["gptq"].config(actorder="none").block_size == 128
