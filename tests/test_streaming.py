"""Streaming: peak memory tracks one layer plus one shard, not the model; shards and index."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmpress import compress

LAYER_BYTES = 2 * (4 * 1024 * 1024 + 3 * 1024 * 4096)  # attention + MLP of one layer, bf16


def _build(path, layers: int):
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.save_pretrained(path, max_shard_size="100MB")
    return path


def _peak_rss_of_cli(model, out) -> int:
    """Peak RSS in bytes of a whole `llmpress compress` process (its own child)."""
    code = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    cmd = [
        sys.executable,
        "-m",
        "llmpress.cli",
        "compress",
        str(model),
        "-o",
        str(out),
        "--scheme",
        "W4A16",
        "--max-shard-size",
        "64MB",
        "--quiet",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True
    )
    return int(proc.stdout.strip().splitlines()[-1]) * 1024


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {n: _build(root / f"l{n}", n) for n in (4, 16)}


def test_peak_memory_does_not_grow_with_model_size(two_sizes, tmp_path):
    assert resource  # ru_maxrss is measured in a separate process, never in this one
    small = _peak_rss_of_cli(two_sizes[4], tmp_path / "a")
    large = _peak_rss_of_cli(two_sizes[16], tmp_path / "b")
    extra_weights = 12 * LAYER_BYTES  # ~400 MB more model
    assert large - small < 0.25 * extra_weights, (small / 1e6, large / 1e6)
    # One layer resident, its outputs, one 64 MB shard buffer, and the interpreter + torch.
    assert large < 700e6 + 3 * LAYER_BYTES + 64e6, large / 1e6


def test_output_is_sharded_with_a_complete_index(two_sizes, tmp_path):
    out = compress(
        two_sizes[4], tmp_path / "o", "FP8_DYNAMIC", max_shard_size=40_000_000, progress=False
    ).output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert all(name.endswith(f"-of-{len(shards):05d}.safetensors") for name in shards)
    assert "model.layers.3.mlp.down_proj.weight_scale" in index["weight_map"]
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
