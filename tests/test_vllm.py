"""vLLM reads what llmpress writes: served on CPU where vLLM's CPU build can, mapped elsewhere.

vLLM runs in a child process (tests/vllm_check.py), so its import and threads stay out of pytest.
What this CPU's vLLM kernels cannot run (int4 weight-only layers without AVX-512) must fail
with vLLM's reason and leave the other checkpoints served (tests/vllm_here.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import load_transformers, stored_modules
from transformers import AutoTokenizer
from vllm_here import fp8_kv_cache_refusal, missing_kernel, run_check

import llmpress.schemes
from llmpress import compress
from llmpress.evaluate.serving import measure_serving

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.vllm,
]

PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "Once upon a time",
    "The best way to learn a new language is",
    "My favourite food is",
    "In the morning, I usually",
    "The sun is a",
    "To make a cup of tea, you",
]
NEW_TOKENS = 16
# Schemes vLLM's CPU build serves, and how each is made. SmolLM2's width (576) takes group
# 64, not 128. GPTQ with the default actorder (static): same format as RTN, solved weights.
# (actorder=group checkpoints, with weight_g_idx, are refused by vLLM 0.32: "group/dynamic
# activation ordering is no longer supported"; transformers reads them, see test_gptq.)
SERVED: dict[str, dict[str, Any]] = {
    "W4A16": dict(scheme="W4A16", group_size=64),
    "W4A16_ASYM": dict(scheme="W4A16_ASYM", group_size=64),
    "W8A8": dict(scheme="W8A8"),
    "FP8_DYNAMIC": dict(scheme="FP8_DYNAMIC"),
    "W4A16-GPTQ": dict(
        scheme="W4A16",
        group_size=64,
        method="gptq",
        dataset="pydoc-calibration",
        num_samples=8,
        seq_len=128,
    ),
    # 2:4 sparse by SparseGPT, then rounded to nearest (FP8) or solved by GPTQ (W4A16),
    # stored dense with its zeros
    # (vLLM reads sparsity_config without targets; it refuses sparse formats).
    # 32 x 256 tokens (agreement 0.88): on 8 x 128, fewer tokens than down_proj has inputs,
    # the one-pass pruned model is damaged enough that vLLM's fp8 kernels and transformers'
    # fake-quantized ones part on 26 of 128 tokens, gaps up to 1.25 nats (two passes: 0.90).
    "SPARSE24-FP8_DYNAMIC": dict(
        scheme="FP8_DYNAMIC",
        method="sparsegpt",
        mask="2:4",
        dataset="pydoc-calibration",
        num_samples=32,
        seq_len=256,
    ),
    "SPARSE24-W4A16": dict(
        scheme="W4A16",
        group_size=64,
        method="sparsegpt+gptq",
        mask="2:4",
        dataset="pydoc-calibration",
        num_samples=8,
        seq_len=128,
    ),
    # Mixed precision (format "mixed-precision"): int8 weights and dynamic int8 activations
    # on down_proj, int4 weights in groups elsewhere. (vLLM's CPU build has no kernel for
    # 8-bit weight-only layers, as examples/int8-down-proj-int4-elsewhere.yaml makes them.)
    "MIXED": dict(
        groups=[
            {"scheme": "W8A8", "targets": ["re:.*down_proj"]},
            {"scheme": "W4A16", "targets": ["Linear"], "group_size": 64},
        ]
    ),
}
# vLLM's greedy tokens scored by transformers on the same prefix (teacher-forced, so that one
# near-tie does not derail the rest). Measured on 8 x 16 tokens: transformers' argmax is vLLM's
# token at 98% (base), 95% (W4A16), 99% (W4A16_ASYM), 89% (W8A8, FP8_DYNAMIC) of positions;
# the mean log-prob gap to transformers' best is <= 0.06 nats. Free-running decodes diverge at
# such ties even unquantized (vLLM's bf16 kernels say "1000" where transformers says "100").
AGREEMENT, MEAN_GAP = 0.8, 0.15
# Not garbage: mean NLL of vLLM's continuations under the unquantized model, above that of
# vLLM's unquantized continuations (1.07 nats). Measured: +0.02 (W8A8), +0.04 (FP8_DYNAMIC),
# +0.52 (W4A16_ASYM), +0.84 (W4A16); random tokens would cost ~10 nats.
EXTRA_NLL = {
    "W4A16": 1.5,
    "W4A16_ASYM": 1.5,
    "W8A8": 0.3,
    "FP8_DYNAMIC": 0.3,
    "W4A16-GPTQ": 1.5,
    "MIXED": 1.5,
    "SPARSE24-FP8_DYNAMIC": 3.0,
    "SPARSE24-W4A16": 3.0,
}

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
# vLLM 0.32 reads odd bit widths densely packed (ceil(in * bits / 32) int32 per row), while
# compressed-tensors 0.17, which it pins, pads 32 // bits values into each int32: for vLLM
# those checkpoints are written with --packing dense.
ODD_BITS = {"W3A16", "W5A16", "W6A16", "W7A16"}


@torch.no_grad()
def score(
    checkpoint: Path, prompts: list[list[int]], continuations: list[list[int]]
) -> tuple[float, torch.Tensor, float]:
    """Per continuation token, under transformers: is it the argmax, its log-prob gap to the
    argmax, and its negative log-prob."""
    model = load_transformers(checkpoint, decompress=False)
    hits, gaps, nlls = [], [], []
    for prompt, tokens in zip(prompts, continuations, strict=True):
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        logprobs = logits.float().log_softmax(-1)
        chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        hits.append(logprobs.argmax(-1) == torch.tensor(tokens))
        gaps.append(logprobs.max(-1).values - chosen)
        nlls.append(-chosen)
    return torch.cat(hits).float().mean().item(), torch.cat(gaps), torch.cat(nlls).mean().item()


@pytest.fixture(scope="module")
def prompt_ids(smollm2) -> list[list[int]]:
    """Token ids, so that vLLM and transformers read the very same input."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    return [tokenizer(prompt).input_ids for prompt in PROMPTS]


# Served first in the same child as the rest: vLLM's CPU build has no FP4 kernel on any CPU,
# so it must fail there with a reason and take none of the checkpoints after it down.
UNSERVABLE = dict(scheme="NVFP4A16", targets=[r"re:.*layers\.0\.mlp\.down_proj$"])


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served")
    out = {
        name: compress(smollm2, root / name, progress=False, **kwargs).output
        for name, kwargs in {"UNSERVABLE": UNSERVABLE, **SERVED}.items()
    }
    return {"UNSERVABLE": out.pop("UNSERVABLE"), "BASE": smollm2, **out}


@pytest.fixture(scope="module")
def vllm_tokens(served, prompt_ids, tmp_path_factory) -> dict[str, Any]:
    """Every checkpoint (and the base model) served in one child: vLLM's import costs ~15 s.
    Per checkpoint: the token ids per prompt, or {"error": vLLM's error}."""
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.json"
    prompts.write_text(json.dumps(prompt_ids))
    paths = {str(path): name for name, path in served.items()}
    result = run_check(
        "generate", *paths, "--prompts-json", str(prompts), "--max-tokens", str(NEW_TOKENS)
    )
    tokens = {paths[path]: tokens for path, tokens in result.items()}
    assert list(tokens) == list(served)
    for seqs in tokens.values():
        assert "error" in seqs or all(len(t) == NEW_TOKENS for t in seqs)
    return tokens


def served_here(name: str, served: dict[str, Path], vllm_tokens: dict[str, Any]) -> bool:
    """Whether vLLM served `name` here. Not served is right only where this CPU's vLLM lacks
    a kernel the checkpoint needs, and then vLLM's error names it; the rest must serve."""
    missing = missing_kernel(served[name])
    outcome = vllm_tokens[name]
    if missing is None:
        assert "error" not in outcome, outcome
        return True
    assert set(outcome) == {"error"} and missing in outcome["error"], outcome
    return False


def test_an_unservable_checkpoint_takes_no_other_down(vllm_tokens):
    """Served first, NVFP4 fails with vLLM's reason; the base and the rest still decode."""
    failed = vllm_tokens["UNSERVABLE"]
    assert set(failed) == {"error"} and "FP4" in failed["error"], failed
    assert isinstance(vllm_tokens["BASE"], list) and isinstance(vllm_tokens["W8A8"], list)


@pytest.mark.parametrize("name", ["BASE", *SERVED])
def test_vllm_decodes_like_transformers(name, served, vllm_tokens, prompt_ids):
    """vLLM's CPU kernels pick the greedy tokens transformers picks from the same checkpoint,
    and where they differ it is a near-tie for transformers too (where this CPU's vLLM has
    the kernels: elsewhere, the missing one named in its error)."""
    if not served_here(name, served, vllm_tokens):
        return
    agreement, gaps, _ = score(served[name], prompt_ids, vllm_tokens[name])
    assert agreement >= AGREEMENT, (agreement, gaps.tolist())
    assert gaps.mean().item() <= MEAN_GAP, gaps.tolist()


@pytest.fixture(scope="module")
def base_nll(smollm2, vllm_tokens, prompt_ids) -> float:
    """The unquantized model's NLL of its own continuations, as vLLM served them."""
    return score(smollm2, prompt_ids, vllm_tokens["BASE"])[2]


@pytest.mark.parametrize("name", SERVED)
def test_vllm_output_reads_like_the_base_model(
    name, smollm2, served, vllm_tokens, prompt_ids, base_nll
):
    """Not garbage: the unquantized model finds vLLM's quantized continuations likely."""
    if not served_here(name, served, vllm_tokens):
        return
    _, _, nll = score(smollm2, prompt_ids, vllm_tokens[name])
    assert nll <= base_nll + EXTRA_NLL[name], (nll, base_nll)


@pytest.fixture(scope="module")
def mapped(tiny_llama, tmp_path_factory) -> dict[str, dict[str, str]]:
    """vLLM's scheme for every layer of every preset, decided as on an H100, in one child.

    The tiny Llama (widths 256/512, 128 per KV projection) fits every preset's default group
    and block: SmolLM2 does not (W4AFP8 needs group 128, FP8_BLOCK 128-row blocks).
    """
    root = tmp_path_factory.mktemp("mapped")
    paths = {
        str(
            compress(tiny_llama, root / name, name, packing=_packing(name), progress=False).output
        ): name
        for name in MAPPED
    }
    result = run_check("schemes", *paths, "--capability", "9.0")
    return {paths[path]: layers for path, layers in result.items()}


def _packing(name: str) -> str:
    return "dense" if name in ODD_BITS else "auto"


@pytest.mark.parametrize("name", list(MAPPED))
def test_vllm_maps_every_layer(name, mapped):
    """Each quantized Linear gets vLLM's scheme for the preset, and its stored tensors match
    the parameters that scheme creates (names, and shapes after vLLM's q/k/v, gate/up fusion)."""
    layers = mapped[name]
    assert len(layers) == 8  # 2 decoder layers x (qkv, o, gate_up, down)
    assert set(layers.values()) == {MAPPED[name]}, layers


def test_vllm_rejects_padded_odd_bits(tiny_llama, tmp_path):
    """Why --packing dense exists: the layout compressed-tensors 0.17 writes does not load."""
    checkpoint = compress(
        tiny_llama, tmp_path / "w3", "W3A16", packing="padded", progress=False
    ).output
    (layers,) = run_check("schemes", str(checkpoint), "--capability", "9.0").values()
    assert all("vLLM expects" in v for v in layers.values()), layers


def test_vllm_check_rejects_unpacked_w4afp8(tiny_llama, tmp_path, monkeypatch):
    """The check can fail: W4AFP8 as llm-compressor writes it by default (int-quantized, one
    int8 per weight) has no parameter to load into; vLLM wants it pack-quantized.

    Editing only config.json's format would not do: on sm90 vLLM picks CompressedTensorsW4A8Fp8
    whatever the format says, and loads the packed tensors by name. (Elsewhere no W4AFP8
    checkpoint maps: "No compressed-tensors compatible scheme was found".)
    """
    monkeypatch.setattr(llmpress.schemes, "PACKED_WITH_ACTIVATIONS", set())
    checkpoint = compress(tiny_llama, tmp_path / "w4afp8", "W4AFP8", progress=False).output
    qconfig = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "int-quantized"
    (layers,) = run_check("schemes", str(checkpoint), "--capability", "9.0").values()
    assert len(layers) == 8
    assert all(v.startswith("ERROR: no vLLM parameter for weight of") for v in layers.values())


def test_vllm_serves_an_fp8_kv_cache_with_the_stored_scales(smollm2, prompt_ids, tmp_path):
    """--kv-cache: vLLM's CPU build keeps the cache in fp8 with the checkpoint's k/v scales
    (per head: their maximum, one scale per layer, as vLLM reduces them for kernels other than
    FlashAttention 3) and decodes what transformers decodes from the same checkpoint; on CPUs
    where vLLM takes no fp8 cache, both are refused with vLLM's reason."""
    calibration = dict(dataset="pydoc-calibration", num_samples=4, seq_len=64)
    checkpoints = [
        compress(
            smollm2, tmp_path / kv, "FP8_DYNAMIC", kv_cache=kv, progress=False, **calibration
        ).output
        for kv in ("fp8", "fp8-head")
    ]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(prompt_ids))
    served = run_check(
        "generate",
        *map(str, checkpoints),
        "--prompts-json",
        str(prompts),
        "--max-tokens",
        str(NEW_TOKENS),
        "--attention",
    )
    if (refusal := fp8_kv_cache_refusal()) is not None:
        # No AVX-512 or AMX: vLLM refuses the fp8 cache, for every checkpoint, and llmpress
        # reports it as not served with vLLM's reason.
        for checkpoint in checkpoints:
            assert served[str(checkpoint)] == {"error": f"NotImplementedError: {refusal}"}
        result = measure_serving(checkpoints[0], ["The capital of France is"], output_tokens=2)
        assert not result.served and refusal in result.reason, result
        return
    for checkpoint in checkpoints:
        result = served[str(checkpoint)]
        assert "error" not in result, result
        stored = stored_modules(checkpoint)
        assert len(result["attention"]) == 30
        for name, layer in result["attention"].items():
            scales = stored[name.removesuffix(".attn")]  # vLLM's Attention inside self_attn
            assert layer["kv_cache_dtype"] == "fp8", (name, layer)
            assert layer["k_scale"] == scales["k_scale"].float().max().item(), name
            assert layer["v_scale"] == scales["v_scale"].float().max().item(), name
        agreement, gaps, _ = score(checkpoint, prompt_ids, result["tokens"])
        # Measured: 0.87 (fp8), 0.84 (fp8-head); FP8_DYNAMIC alone 0.89 (above).
        assert agreement >= AGREEMENT, (checkpoint.name, agreement, gaps.tolist())
