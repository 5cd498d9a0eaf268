"""Several model families, generated tiny: each loads in transformers and stays close."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from helpers import load_transformers, logits, relative_error, stored_modules

from llmpress import compress

BOUND = {"W4A16": 0.45, "NVFP4A16": 0.35, "FP8_DYNAMIC": 0.15}


@pytest.mark.parametrize("scheme", sorted(BOUND))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_and_stays_close(family, scheme, tiny_models, tmp_path):
    source = tiny_models[family]
    out = compress(source, tmp_path / "out", scheme, progress=False).output
    ids = torch.randint(3, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    base = logits(load_transformers(source, decompress=False), ids)
    quant = logits(load_transformers(out, decompress=False), ids)
    assert torch.isfinite(quant).all()
    assert 0 < relative_error(quant, base) < BOUND[scheme]
    linears = [m for m, s in stored_modules(out).items() if "weight_scale" in s]
    assert len(linears) == (8 if family == "phi3" else 14)  # phi3 fuses qkv and gate/up


def test_fused_siblings_share_the_nvfp4_global_scale(tiny_llama, tmp_path):
    out = compress(tiny_llama, tmp_path / "out", "NVFP4A16", progress=False).output
    modules = stored_modules(out)

    def gscale(name: str) -> float:
        return float(modules[f"model.layers.0.{name}"]["weight_global_scale"])

    assert gscale("self_attn.q_proj") == gscale("self_attn.k_proj") == gscale("self_attn.v_proj")
    assert gscale("mlp.gate_proj") == gscale("mlp.up_proj")
    assert gscale("self_attn.q_proj") != gscale("mlp.gate_proj")
    assert gscale("self_attn.o_proj") != gscale("mlp.down_proj")
