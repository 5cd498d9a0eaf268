"""vLLM reads what llmpress writes: served on CPU where vLLM's CPU build can, mapped elsewhere.

vLLM runs in a child process (tests/vllm_check.py), so its import and threads stay out of pytest.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_transformers
from transformers import AutoTokenizer, GenerationConfig

import llmpress.schemes
from llmpress import compress

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
]

CHECK = Path(__file__).with_name("vllm_check.py")
PROMPTS = ["The capital of France is", "Water boils at", "Once upon a time"]
NEW_TOKENS = 16
# Schemes vLLM's CPU build serves. SmolLM2's width (576) takes group 64, not 128.
SERVED = {"W4A16": 64, "W4A16_ASYM": 64, "W8A8": None, "FP8_DYNAMIC": None}
# Greedy tokens that must equal transformers' before the first allowed divergence, and the share
# of all positions that must. Measured: every scheme agrees on all 16 tokens of every prompt;
# the bounds leave room for one late flip of a near-tie, which vLLM's kernels may cause.
PREFIX, AGREEMENT = 8, 0.75
# Against the unquantized model; 8-bit schemes should barely move greedy decoding.
BASE_PREFIX = {"W8A8": 2, "FP8_DYNAMIC": 4}

# The scheme class vLLM 0.32 builds for each preset, on an H100 (sm90).
MAPPED = {
    "W4A16": "CompressedTensorsWNA16",
    "W4A16_ASYM": "CompressedTensorsWNA16",
    "W8A16": "CompressedTensorsWNA16",
    "W2A16": "CompressedTensorsWNA16",
    "W3A16": "CompressedTensorsWNA16",
    "W5A16": "CompressedTensorsWNA16",
    "W6A16": "CompressedTensorsWNA16",
    "W7A16": "CompressedTensorsWNA16",
    "W8A8": "CompressedTensorsW8A8Int8",
    "W4A8": "CompressedTensorsWNA8Int",
    "W4AFP8": "CompressedTensorsW4A8Fp8",
    "FP8_DYNAMIC": "CompressedTensorsW8A8Fp8",
    "FP8_BLOCK": "CompressedTensorsW8A8Fp8",
    "NVFP4A16": "CompressedTensorsW4A4Fp4",
    "MXFP4A16": "CompressedTensorsW4A4Mxfp4",
    "MXFP4": "CompressedTensorsW4A4Mxfp4",
    "MXFP8A16": "CompressedTensorsW8A8Mxfp8",
    "MXFP8": "CompressedTensorsW8A8Mxfp8",
}
# vLLM 0.32 reads odd bit widths densely packed (ceil(in * bits / 32) int32 per row);
# compressed-tensors 0.17, which it pins, writes 32 // bits values per int32.
ODD_BITS = pytest.mark.xfail(
    strict=True, reason="vLLM 0.32 expects dense odd-bit packing; compressed-tensors 0.17 pads"
)


def run_check(*args: str) -> Any:
    """Run tests/vllm_check.py and return its RESULT; its stderr tail on failure."""
    proc = subprocess.run(
        [sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=900
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        pytest.fail(f"vllm_check {args[0]} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(results[-1].removeprefix("RESULT "))


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def one_thread():
    """Two torch threads on this 2-core runner decode ~10x slower than one: they contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompt_ids(smollm2) -> list[list[int]]:
    """Token ids, so that vLLM and transformers decode from the very same input."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return [tokenizer(prompt).input_ids for prompt in PROMPTS]


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    out = {name: compress(smollm2, root / name, name, group_size=group, progress=False).output
           for name, group in SERVED.items()}
    return {"BASE": smollm2, **out}


@pytest.fixture(scope="module")
def vllm_tokens(served, prompt_ids, tmp_path_factory) -> dict[str, list[list[int]]]:
    """Every checkpoint (and the base model) served in one child: vLLM's import costs ~15 s."""
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.json"
    prompts.write_text(json.dumps(prompt_ids))
    paths = {str(path): name for name, path in served.items()}
    result = run_check("generate", *paths, "--prompts-json", str(prompts),
                       "--max-tokens", str(NEW_TOKENS))
    return {paths[path]: tokens for path, tokens in result.items()}


@torch.no_grad()
def transformers_tokens(checkpoint: Path, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy, and past EOS like vLLM's ignore_eos, so both always give NEW_TOKENS tokens."""
    model = load_transformers(checkpoint, decompress=False)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    out = []
    for ids in prompt_ids:
        inputs = torch.tensor([ids])
        tokens = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                generation_config=config)
        out.append(tokens[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def base_tokens(smollm2, prompt_ids, one_thread) -> list[list[int]]:
    return transformers_tokens(smollm2, prompt_ids)


@pytest.mark.parametrize("name", ["BASE", *SERVED])
def test_vllm_decodes_like_transformers(name, served, vllm_tokens, prompt_ids, one_thread):
    """vLLM's CPU kernels and transformers' dequantize path choose the same greedy tokens."""
    ours = vllm_tokens[name]
    theirs = transformers_tokens(served[name], prompt_ids)
    assert all(len(tokens) == NEW_TOKENS for tokens in ours)
    prefixes = [common_prefix(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert min(prefixes) >= PREFIX, (prefixes, ours, theirs)
    assert agreement(ours, theirs) >= AGREEMENT, (ours, theirs)


@pytest.mark.parametrize("name", BASE_PREFIX)
def test_vllm_8bit_stays_near_base(name, vllm_tokens, base_tokens):
    """Not garbage: 8-bit schemes served by vLLM start as the unquantized model does."""
    prefixes = [common_prefix(a, b) for a, b in zip(vllm_tokens[name], base_tokens, strict=True)]
    assert min(prefixes) >= BASE_PREFIX[name], (prefixes, vllm_tokens[name], base_tokens)


@pytest.fixture(scope="module")
def mapped(tiny_llama, tmp_path_factory) -> dict[str, dict[str, str]]:
    """vLLM's scheme for every layer of every preset, decided as on an H100, in one child.

    The tiny Llama (widths 256/512, 128 per KV projection) fits every preset's default group
    and block: SmolLM2 does not (W4AFP8 needs group 128, FP8_BLOCK 128-row blocks).
    """
    root = tmp_path_factory.mktemp("mapped")
    paths = {str(compress(tiny_llama, root / name, name, progress=False).output): name
             for name in MAPPED}
    result = run_check("schemes", *paths, "--capability", "9.0")
    return {paths[path]: layers for path, layers in result.items()}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=ODD_BITS) if n in {"W3A16", "W5A16", "W6A16", "W7A16"}
             else n for n in MAPPED]
)
def test_vllm_maps_every_layer(name, mapped):
    """Each quantized Linear gets vLLM's scheme for the preset, and its stored tensors match
    the parameters that scheme creates (names, and shapes after vLLM's q/k/v, gate/up fusion)."""
    layers = mapped[name]
    assert len(layers) == 8  # 2 decoder layers x (qkv, o, gate_up, down)
    assert set(layers.values()) == {MAPPED[name]}, layers


def test_vllm_check_rejects_unpacked_w4afp8(tiny_llama, tmp_path, monkeypatch):
    """The check can fail: W4AFP8 as llm-compressor writes it by default (int-quantized, one
    int8 per weight) has no parameter to load into; vLLM wants it pack-quantized."""
    monkeypatch.setattr(llmpress.schemes, "PACKED_WITH_ACTIVATIONS", set())
    checkpoint = compress(tiny_llama, tmp_path / "w4afp8", "W4AFP8", progress=False).output
    qconfig = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "int-quantized"
    (layers,) = run_check("schemes", str(checkpoint), "--capability", "9.0").values()
    assert len(layers) == 8
    assert all(v.startswith("ERROR: no vLLM parameter for weight of") for v in layers.values())
