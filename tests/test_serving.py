"""Serving speed under vLLM: figures for what vLLM serves here, a one-line reason for the rest.

Each measurement starts vLLM in a child process (~7 s of import on 2 cores), so the file
serves two checkpoints and fails two; timings are never compared to a threshold (other jobs
share the machine), only to each other where the ratio is far from any noise.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vllm_here import missing_kernel

from llmpress import compress
from llmpress.evaluate import serving
from llmpress.evaluate.serving import ServingResult, measure_serving

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.vllm]

PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "Once upon a time",
    "The best way to learn a new language is",
]
OUTPUT_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoints(smollm2, tmp_path_factory) -> dict[str, Path]:
    """The bf16 base and W4A16 (group 64: SmolLM2's width 576 does not take 128)."""
    root = tmp_path_factory.mktemp("serving")
    w4a16 = compress(smollm2, root / "W4A16", "W4A16", group_size=64, progress=False).output
    return {"BASE": smollm2, "W4A16": w4a16}


def assert_not_served(result: ServingResult) -> None:
    assert result.served is False
    assert result.reason and result.reason.strip() == result.reason
    assert "\n" not in result.reason and "Traceback" not in result.reason
    assert (result.ttft_ms, result.tpot_ms, result.throughput_tok_s) == (None, None, None)


@pytest.mark.parametrize("name", ["BASE", "W4A16"])
def test_served_checkpoint_has_finite_positive_figures(name, checkpoints):
    """vLLM's CPU build serves the base, and W4A16 where its kernels for this CPU have
    cpu_gemm_wna16 (AVX-512): three positive figures, no reason. Elsewhere W4A16 is not
    served, and the reason names the missing op and this CPU, in one line."""
    result = measure_serving(checkpoints[name], PROMPTS, output_tokens=OUTPUT_TOKENS)
    if (missing := missing_kernel(checkpoints[name])) is not None:
        assert_not_served(result)
        assert f"have no {missing} op" in result.reason, result.reason
        assert torch.backends.cpu.get_cpu_capability() in result.reason, result.reason
        assert result.vllm_version
        return
    assert result.served, result.reason
    assert result.reason is None
    figures = (result.ttft_ms, result.tpot_ms, result.throughput_tok_s)
    assert all(f is not None and math.isfinite(f) and f > 0 for f in figures), result
    assert result.device == "cpu" or torch.cuda.is_available()
    assert result.vllm_version
    # Decoding 4 prompts together is not 2x slower per step than decoding one: measured
    # throughput x TPOT ~3.3 (base) and ~3.5 (W8A8) with 4 prompts on 2 cores.
    assert result.throughput_tok_s * result.tpot_ms / 1000 > 0.5, result
    assert json.loads(json.dumps(result.to_json())) == result.to_json()


def test_scheme_without_kernel_is_not_served_with_vllms_reason(smollm2, tmp_path):
    """NVFP4 has no CPU kernel: a one-line reason from vLLM's error, no exception.

    One NVFP4 layer is enough for vLLM to refuse the checkpoint, and compresses in ~3 s
    where the whole model takes ~25 s.
    """
    checkpoint = compress(
        smollm2,
        tmp_path / "nvfp4",
        "NVFP4A16",
        targets=[r"re:.*layers\.0\.mlp\.down_proj$"],
        progress=False,
    ).output
    result = measure_serving(checkpoint, PROMPTS[:1], output_tokens=2)
    assert_not_served(result)
    if torch.cuda.is_available():
        return  # a GPU may serve it
    assert "FP4" in result.reason, result.reason
    assert result.vllm_version


def test_directory_without_model_is_not_served(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    result = measure_serving(tmp_path, PROMPTS[:1], output_tokens=2)
    assert_not_served(result)
    assert str(tmp_path) in result.reason, result.reason


def test_timeout_is_not_served_and_says_so(smollm2):
    result = measure_serving(smollm2, PROMPTS[:1], output_tokens=2, timeout_s=1)
    assert_not_served(result)
    assert "timeout" in result.reason


def test_too_few_output_tokens_is_a_usage_error(smollm2):
    with pytest.raises(ValueError, match="output_tokens must be at least 2"):
        measure_serving(smollm2, PROMPTS, output_tokens=1)


def test_serving_api_does_not_import_vllm():
    """vLLM's import is slow and patches torch: it belongs to the worker process only."""
    code = (
        "import sys, llmpress.evaluate.serving as s; s.vllm_unavailable_reason(); "
        "assert 'vllm' not in sys.modules, 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_worker_reason_is_the_key_line_of_the_error():
    """A pydantic error from vLLM's config is reported by its own message, not the wrapper's."""
    from pydantic import BaseModel, field_validator

    from llmpress.evaluate.vllm_worker import one_line, reason

    class Config(BaseModel):
        model: str

        @field_validator("model")
        @classmethod
        def exists(cls, value: str) -> str:
            raise ValueError(f"no config.json in {value}.\nPlease check:\n1. the path")

    with pytest.raises(ValueError) as error:
        Config(model="/nowhere")
    assert one_line(error.value) == "ValidationError: Value error, no config.json in /nowhere."
    assert one_line(RuntimeError("\n  first\nsecond")) == "RuntimeError: first"
    assert serving._last_error_line("x\nValueError: bad scale\nINFO done") == (
        "ValueError: bad scale"
    )
    assert reason(RuntimeError("bad")) == "RuntimeError: bad"


def test_worker_reason_names_a_kernel_missing_on_this_cpu():
    """vLLM's AVX2 kernels lack cpu_gemm_wna16: the error torch raises at the first forward
    is said plainly, on any CPU (the served test sees it for real on AVX2-only CPUs)."""
    from llmpress.evaluate.vllm_worker import reason

    error = AttributeError("'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")
    isa = torch.backends.cpu.get_cpu_capability()
    assert reason(error) == (
        f"vLLM's CPU kernels for this CPU ({isa}) have no cpu_gemm_wna16 op: "
        "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'"
    )
