"""FP8 with static input scales, calibrated layer by layer on real text, for every family
(tiny generated models with a tokenizer trained beside them) and for a BERT encoder (the real
all-MiniLM-L6-v2): the checkpoint loads in transformers and stays close to the base model,
every quantized Linear carries an input scale, and layer 0's scales are exactly what the
plain model's own activations give."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from helpers import COMPUTE_DTYPE, load_transformers, logits, relative_error, stored_modules
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from llmpress import compress
from llmpress.corpora import load_text
from llmpress.data import calibration_set
from llmpress.errors import LlmpressError

CALIBRATION = dict(num_samples=3, seq_len=32, seed=0)  # small: 2 shared cores
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# Relative error of the logits against the base model on held-out text. FP8 weights dominate it
# on these random models (0.08-0.12 measured, as with dynamic per-token input scales); static
# per-tensor scales from a few samples may clip a held-out outlier, and cost 0-5 % more.
BOUND = 0.15
STATIC_OVER_DYNAMIC = 1.2
# MiniLM's last hidden state: 0.08 measured; its mean-pooled sentence embeddings: cosine 0.997.
BERT_BOUND = 0.12


def _held_out_ids(tokenizer, count: int) -> torch.Tensor:
    """The first `count` tokens of the evaluation text (disjoint from calibration), with BOS."""
    body = tokenizer(load_text("pydoc")[:2000], add_special_tokens=False)["input_ids"]
    first = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return torch.tensor([first + body[: count - len(first)]])


def _first_layer_absmax(model, layer, names: list[str], samples) -> dict[str, float]:
    """Largest |input| of each of `names` in `layer`, over `samples` run through `model`."""
    absmax = dict.fromkeys(names, 0.0)

    def track(name):
        def hook(module, args):
            absmax[name] = max(absmax[name], float(args[0].abs().max()))

        return hook

    hooks = [layer.get_submodule(n).register_forward_pre_hook(track(n)) for n in names]
    with torch.inference_mode():
        for sample in samples:
            model(sample.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return absmax


def _assert_every_quantized_linear_has_an_input_scale(checkpoint: Path, count: int) -> None:
    modules = stored_modules(checkpoint)
    quantized = {m for m, state in modules.items() if "weight_scale" in state}
    assert len(quantized) == count
    assert {m for m, state in modules.items() if "input_scale" in state} == quantized
    for name in quantized:
        scale = modules[name]["input_scale"]
        assert scale.shape == (1,) and torch.isfinite(scale).all() and scale[0] > 0, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp8_static_loads_stays_close_and_scales_every_linear(
    family, with_tokenizer, calibration_text, tmp_path
):
    source = with_tokenizer[family]
    out = compress(
        source,
        tmp_path / "fp8",
        "FP8",
        dataset=str(calibration_text),
        progress=False,
        **CALIBRATION,
    ).output
    _assert_every_quantized_linear_has_an_input_scale(out, 8 if family == "phi3" else 14)

    # Layer 0's inputs do not depend on any quantization: the plain model's, hooked, must give
    # its scales exactly (embedding scaling, norms and masks all as the family computes them).
    # The reference model computes in what calibration computes in here (COMPUTE_DTYPE).
    tokenizer = AutoTokenizer.from_pretrained(source)
    samples = calibration_set(str(calibration_text), tokenizer, **CALIBRATION).samples
    base = load_transformers(source, decompress=False)
    plain = AutoModelForCausalLM.from_pretrained(source, dtype=COMPUTE_DTYPE).eval()
    names = ["self_attn.qkv_proj" if family == "phi3" else "self_attn.q_proj", "mlp.down_proj"]
    absmax = _first_layer_absmax(plain, plain.model.layers[0], names, samples)
    stored = stored_modules(out)
    for name in names:
        expected = torch.tensor(absmax[name] / FP8_MAX).to(torch.bfloat16)
        assert stored[f"model.layers.0.{name}"]["input_scale"][0] == expected, name

    ids = _held_out_ids(tokenizer, 48)
    base_logits = logits(base, ids)
    error = relative_error(logits(load_transformers(out, decompress=False), ids), base_logits)
    dynamic = compress(source, tmp_path / "fp8-dynamic", "FP8_DYNAMIC", progress=False).output
    dynamic_error = relative_error(
        logits(load_transformers(dynamic, decompress=False), ids), base_logits
    )
    assert 0 < error < BOUND, error
    assert error < STATIC_OVER_DYNAMIC * dynamic_error, (error, dynamic_error)

    # transformers applies the stored scales: a quarter of each clips the inputs, and it shows.
    clipped = _with_scaled_input_scales(out, tmp_path / "clipped", 0.25)
    clipped_error = relative_error(
        logits(load_transformers(clipped, decompress=False), ids), base_logits
    )
    assert clipped_error > 3 * error, (clipped_error, error)


def _with_scaled_input_scales(checkpoint: Path, dest: Path, factor: float) -> Path:
    shutil.copytree(checkpoint, dest)
    for file in dest.glob("*.safetensors"):
        tensors = load_file(file)
        for name in tensors:
            if name.endswith(".input_scale"):
                tensors[name] = tensors[name] * factor
        save_file(tensors, file, metadata={"format": "pt"})
    return dest


def _last_hidden(model, batch) -> torch.Tensor:
    """Every real (unpadded) token's last hidden state, as one (tokens, hidden) matrix."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    return hidden[batch["attention_mask"].bool()]


def _sentence_embeddings(model, batch) -> torch.Tensor:
    """Mean of each text's real tokens' last hidden states: how MiniLM embeds a sentence."""
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    weights = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


BERT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantized encoders should give nearly the same sentence embeddings as the original model.",
]


def test_bert_encoder_fp8_static_loads_and_stays_close(minilm, tmp_path):
    # The pooler reads the last layer's output outside the layer stack, where no scale is
    # calibrated: it is left alone, as the refusal below tells the user to do.
    out = compress(
        minilm,
        tmp_path / "fp8",
        "FP8",
        dataset="pydoc-calibration",
        ignore=["pooler.dense"],
        progress=False,
        **CALIBRATION,
    ).output
    _assert_every_quantized_linear_has_an_input_scale(out, 6 * 6)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    samples = calibration_set("pydoc-calibration", tokenizer, **CALIBRATION).samples
    assert all(s[0] == tokenizer.cls_token_id for s in samples)

    base = AutoModel.from_pretrained(minilm).eval()
    names = ["attention.self.query", "output.dense"]
    absmax = _first_layer_absmax(base, base.encoder.layer[0], names, samples)
    stored = stored_modules(out)
    for name in names:
        expected = torch.tensor(absmax[name] / FP8_MAX)  # fp32 model: fp32 scales
        torch.testing.assert_close(stored[f"encoder.layer.0.{name}"]["input_scale"][0], expected)

    quant = AutoModel.from_pretrained(out).eval()
    assert quant.encoder.layer[0].attention.self.query.quantization_scheme is not None
    batch = tokenizer(BERT_TEXTS, padding=True, return_tensors="pt")
    error = relative_error(_last_hidden(quant, batch), _last_hidden(base, batch))
    assert 0 < error < BERT_BOUND, error
    cosine = torch.cosine_similarity(
        _sentence_embeddings(quant, batch), _sentence_embeddings(base, batch)
    )
    assert (cosine > 0.99).all(), cosine


def test_bert_pooler_outside_the_layers_is_refused_with_the_fix(minilm, tmp_path):
    with pytest.raises(LlmpressError, match="pooler.dense is outside them: --ignore it"):
        compress(
            minilm,
            tmp_path / "x",
            "FP8",
            dataset="pydoc-calibration",
            progress=False,
            **CALIBRATION,
        )
    assert not (tmp_path / "x").exists()


def test_bert_encoder_data_free_loads_and_stays_close(tmp_path):
    """A tiny random BERT saved as `BertModel`: data-free W8A16 finds its layers by their
    checkpoint names (`encoder.layer.*`) and `AutoModel` loads the result."""
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=512,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    out = compress(tmp_path / "bert", tmp_path / "w8", "W8A16", progress=False).output
    modules = stored_modules(out)
    assert sum("weight_scale" in state for state in modules.values()) == 2 * 6 + 1  # + pooler
    assert "encoder.layer.1.output.dense" in modules
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0  # a padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    base = AutoModel.from_pretrained(tmp_path / "bert").eval()
    quant = AutoModel.from_pretrained(out).eval()
    error = relative_error(_last_hidden(quant, batch), _last_hidden(base, batch))
    assert 0 < error < 0.02, error
