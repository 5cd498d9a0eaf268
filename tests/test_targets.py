"""Targets and ignore follow compressed-tensors' rules: name, class, `re:` regex; ignore wins."""

from __future__ import annotations

import json

import pytest
from helpers import load_transformers, stored_modules

from llmpress import compress


def _quantized(out) -> set[str]:
    return {m for m, s in stored_modules(out).items() if "weight_scale" in s}


def test_default_leaves_head_and_embeddings_alone(tiny_llama, tmp_path):
    out = compress(tiny_llama, tmp_path / "o", "W8A8", progress=False).output
    quantized = _quantized(out)
    assert "lm_head" not in quantized and "model.embed_tokens" not in quantized
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["ignore"] == ["lm_head"]


@pytest.mark.parametrize(
    ("targets", "ignore", "expected"),
    [
        (["re:.*mlp.*"], [], {"gate_proj", "up_proj", "down_proj"}),
        (["Linear"], ["re:.*self_attn.*", "lm_head"], {"gate_proj", "up_proj", "down_proj"}),
        (["model.layers.0.self_attn.q_proj"], [], {"q_proj"}),
        (
            ["re:.*proj$"],
            ["re:.*down_proj"],
            {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"},
        ),
    ],
)
def test_targets_and_ignore(targets, ignore, expected, tiny_llama, tmp_path):
    out = compress(
        tiny_llama, tmp_path / "o", "W4A16", targets=targets, ignore=ignore, progress=False
    ).output
    leaves = {m.rsplit(".", 1)[1] for m in _quantized(out)}
    assert leaves == expected
    # transformers applies the same plan when it reads the config back: every layer we left in
    # 16 bits stays an unquantized Linear, every quantized one carries a scheme.
    model = load_transformers(out)
    schemed = {n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None)}
    assert schemed == _quantized(out)


def test_ignored_targets_are_listed_for_readers(tiny_llama, tmp_path):
    out = compress(
        tiny_llama, tmp_path / "o", "W4A16", ignore=["re:.*down_proj", "lm_head"], progress=False
    ).output
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(ignore) == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
