"""Shared fixtures: tiny generated models of several families, the real SmolLM2-135M and the
real all-MiniLM-L6-v2 encoder (BERT)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import bpe_tokenizer
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from llmpress.corpora import load_text

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist the cores are shared among the workers: torch's threads too.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / ".cache" / "fixtures" / "smollm2-135m"
MINILM = REPO / ".cache" / "fixtures" / "all-minilm-l6-v2"

MOE_EXPERTS, MOE_LAYERS = 8, 2

# Small enough to build in milliseconds, wide enough for group 128 and 128x128 blocks.
_DIMS = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=512,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
# Sliding windows shorter than the longest test sample, so that the masks they need differ
# from plain causal ones; Gemma3 mixes sliding and global layers (own masks and rotary tables).
FAMILIES = {
    "llama": lambda: LlamaConfig(**_DIMS),
    "qwen2": lambda: Qwen2Config(**_DIMS),
    "qwen3": lambda: Qwen3Config(**_DIMS),
    "mistral": lambda: MistralConfig(**_DIMS, sliding_window=64),
    "gemma3": lambda: Gemma3TextConfig(
        **_DIMS, sliding_window=64, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi3": lambda: Phi3Config(
        **{k: v for k, v in _DIMS.items() if k != "head_dim"}, pad_token_id=0
    ),
}


def build_tiny(family: str, path: Path, seed: int = 0) -> Path:
    """A random bf16 model of `family`, saved as safetensors in `path`."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # wider than the default init so quantization error is visible
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tokenized_llama(tmp_path_factory, smollm2) -> Path:
    """A random 16-layer Llama small enough to calibrate in seconds, with SmolLM2's real
    tokenizer (its vocabulary size), for runs that need calibration text."""

    torch.manual_seed(0)
    dims = {**_DIMS, "num_hidden_layers": 16, "vocab_size": 49152, "hidden_size": 128}
    dims.update(intermediate_size=256, head_dim=32)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**dims), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("tokenized") / "llama"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, path / name)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    if not (SMOLLM2 / "config.json").is_file():
        pytest.fail(f"SmolLM2 fixture missing at {SMOLLM2}: run `bash scripts/install.sh`")
    return SMOLLM2


@pytest.fixture(scope="session")
def minilm() -> Path:
    if not (MINILM / "config.json").is_file():
        pytest.fail(f"MiniLM fixture missing at {MINILM}: run `bash scripts/install.sh`")
    return MINILM


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread while a module runs vLLM beside torch work: on the 2-core runner two
    threads contend with vLLM's and run 5-10x slower (compress included)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory) -> Path:
    """A small .txt of real English: the calibration part of Python's documentation."""
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(load_text("pydoc-calibration")[:20_000])
    return path


@pytest.fixture(scope="session")
def with_tokenizer(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """The tiny models, each with a BPE tokenizer saved beside it (ids 1, 2: BOS, EOS)."""
    tokenizer = bpe_tokenizer(512)
    root = tmp_path_factory.mktemp("with-tokenizer")
    models = {}
    for family, path in tiny_models.items():
        models[family] = root / family
        shutil.copytree(path, models[family])
        tokenizer.save_pretrained(models[family])
    return models


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory, smollm2) -> Path:
    """8 experts, 2 chosen per token, SmolLM2's tokenizer; weights wider than the default
    init so that quantization error is visible."""
    config = Qwen3MoeConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=MOE_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_experts=MOE_EXPERTS, num_experts_per_tok=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("moe") / "qwen3-moe"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, path / name)
    return path
