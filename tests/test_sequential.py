"""One pass per layer, each module compressed once every batch has reached it
(llmpress.sequential), and when runs choose it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from llmpress.api import compress_options
from llmpress.errors import LlmpressError
from llmpress.estimate import dry_run, sequential_bytes
from llmpress.plan import build_plan
from llmpress.sequential import Sequencer
from llmpress.source import ModelSource
from llmpress.stages import stages_of


class TwoSteps(nn.Module):
    """first -> relu -> second, as a decoder layer chains its modules."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8, bias=False)
        self.second = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_each_module_sees_its_compressed_predecessors_and_every_batch_first():
    layer = TwoSteps()
    batches = [torch.randn(3, 8) for _ in range(4)]
    seen: dict[str, list[torch.Tensor]] = {"first": [], "second": []}
    for name in seen:
        module = getattr(layer, name)
        module.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
    halved = layer.first.weight.detach() / 2
    compressed_at: dict[str, int] = {}

    def compress(name: str) -> list[str]:
        compressed_at[name] = len(seen[name])  # how many batches it had seen
        if name == "first":
            layer.first.weight.data = halved.clone()
        return [name]

    outputs: dict[int, torch.Tensor] = {}
    sequencer = Sequencer({"first": layer.first, "second": layer.second})
    sequencer.run(
        [lambda x=x: layer(x) for x in batches],
        compress,
        lambda i, out: outputs.__setitem__(i, out),
    )
    assert compressed_at == {"first": 4, "second": 4}
    expected_inputs = [torch.relu(x @ halved.t()) for x in batches]
    for got, want in zip(seen["second"], expected_inputs, strict=True):
        torch.testing.assert_close(got, want)
    for i, x in enumerate(batches):
        torch.testing.assert_close(outputs[i], layer(x))
    assert len(layer.first._forward_pre_hooks) == 1  # the pause is gone, this test's stays


def test_hooks_registered_while_a_batch_waits_act_on_its_call():
    """The compressed module's input quantizer, registered during the pause, applies to the
    calls that were waiting, as to later ones."""
    layer = TwoSteps()
    batches = [torch.randn(2, 8) for _ in range(3)]

    def compress(name: str) -> list[str]:
        getattr(layer, name).register_forward_pre_hook(lambda m, args: (args[0] * 0,))
        return [name]

    outputs: dict[int, torch.Tensor] = {}
    Sequencer({"first": layer.first}).run(
        [lambda x=x: layer(x) for x in batches],
        compress,
        lambda i, out: outputs.__setitem__(i, out),
    )
    for out in outputs.values():
        assert torch.equal(out, torch.zeros_like(out))


def test_batches_that_call_modules_in_different_orders_are_refused():
    layer = TwoSteps()
    calls = [lambda: layer.first(torch.randn(2, 8)), lambda: layer.second(torch.randn(2, 8))]
    with pytest.raises(LlmpressError, match="different orders.*--propagate compressed"):
        Sequencer({"first": layer.first, "second": layer.second}).run(
            calls, lambda name: [name], lambda i, out: None
        )


def test_smoothing_and_the_kv_cache_are_refused_one_pass(with_tokenizer):
    model = with_tokenizer["llama"]
    source = ModelSource.open(model)
    for kwargs in (
        dict(scheme="W4A16", method="awq"),
        dict(scheme="W8A8", method="smoothquant+gptq"),
        dict(scheme="FP8_DYNAMIC", method="gptq", kv_cache="fp8"),
    ):
        options = compress_options(kwargs.pop("scheme"), dataset="pydoc-calibration", **kwargs)
        with pytest.raises(LlmpressError, match="need a whole layer observed first"):
            stages_of(build_plan(source, options), False, "sequential")
    # GPTQ alone may run in one pass when asked; its default stays two.
    options = compress_options("W4A16", method="gptq", dataset="pydoc-calibration")
    (stage,) = stages_of(build_plan(source, options), False, "sequential")
    assert stage.sequential
    assert dry_run(model, options)["calibration"]["propagate"] == "compressed"


def test_a_memory_cap_too_small_for_one_pass_gives_two(with_tokenizer):
    model = with_tokenizer["llama"]
    options = compress_options(None, method="sparsegpt", dataset="pydoc-calibration")
    source = ModelSource.open(model)
    need = sequential_bytes(source, build_plan(source, options), options)
    assert dry_run(model, options, max_memory=need)["calibration"]["propagate"] == "sequential"
    assert dry_run(model, options, max_memory=need - 1)["calibration"]["propagate"] == "compressed"
    explicit = compress_options(
        None, method="sparsegpt", dataset="pydoc-calibration", propagate="sequential"
    )
    with pytest.raises(LlmpressError, match="over --max-memory.*--propagate compressed"):
        dry_run(model, explicit, max_memory=need - 1)


def test_the_cli_says_which_pass_it_runs_and_refuses_one_pass_with_awq(with_tokenizer, tmp_path):
    model, out = with_tokenizer["llama"], tmp_path / "out"

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "llmpress.cli", "compress", str(model), "-o", str(out)]
        return subprocess.run([*command, *args], capture_output=True, text=True)

    pruning = ("--method", "sparsegpt", "--mask", "2:4", "--dataset", "pydoc-calibration")
    proc = cli(*pruning, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "every module calibrates on the compressed modules' outputs" in proc.stdout
    proc = cli(*pruning, "--propagate", "compressed", "--dry-run")
    assert proc.returncode == 0 and "every module calibrates" not in proc.stdout
    awq = ("--scheme", "W4A16", "--method", "awq", "--dataset", "pydoc-calibration")
    proc = cli(*awq, "--propagate", "sequential")
    assert proc.returncode != 0
    assert "smoothing (AWQ, SmoothQuant) and --kv-cache need a whole layer" in proc.stderr
    assert not out.exists()
