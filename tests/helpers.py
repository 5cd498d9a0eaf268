"""Readers used by the tests: the real clients (transformers, compressed-tensors), no mocks."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.utils.quantization_config import CompressedTensorsConfig

from llmpress.stages import compute_dtype

# What calibration computes a bf16 checkpoint in on this CPU (bf16 where it has bf16 units,
# else float32): references computed in it must give the stored scales exactly.
COMPUTE_DTYPE = compute_dtype("cpu", torch.bfloat16)


def stored_modules(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of the checkpoint, grouped by module, under local names."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118
                module, _, param = key.rpartition(".")
                modules[module][param] = reader.get_tensor(key)
    return dict(modules)


def group_scheme(checkpoint: Path) -> QuantizationScheme:
    qconfig = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    (group,) = qconfig["config_groups"].values()
    return QuantizationScheme.model_validate(group)


def ct_decompressed_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Weights as compressed-tensors' own decompressor rebuilds them from the stored state."""
    scheme = group_scheme(checkpoint)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    out = {}
    for module, state in stored_modules(checkpoint).items():
        if "weight_scale" in state:
            out[module] = compressor.decompress(state, scheme)["weight"]
    return out


def load_transformers(checkpoint: Path, decompress: bool = True, dtype=torch.bfloat16):
    """transformers' loader; `decompress` unpacks weights at load so they can be compared."""
    kwargs = {}
    if decompress:
        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **kwargs).eval()


def layer0_inputs(model_dir: Path, names, calibration: dict) -> dict[str, torch.Tensor]:
    """Each named layer-0 module's inputs [tokens, in_features] on the calibration samples,
    from the plain model computed as calibration computes here: they depend on no
    quantization, so an independent reference for layer 0's scales and errors."""
    inputs = module_inputs(model_dir, names, calibration, layers=(0,))
    return {name.removeprefix("model.layers.0."): x for name, x in inputs.items()}


def module_inputs(
    model_dir: Path, names, calibration: dict, layers, dtype=None
) -> dict[str, torch.Tensor]:
    """The named modules' inputs [tokens, in_features] in each of `layers`, by full name
    ("model.layers.3.mlp.down_proj"), from the plain model on the calibration samples,
    computed in `dtype` (default: what calibration computes in here), returned in float32."""
    from transformers import AutoTokenizer

    from llmpress.data import calibration_set

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = calibration_set(
        calibration["dataset"], tokenizer, calibration["num_samples"], calibration["seq_len"]
    ).samples
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or COMPUTE_DTYPE).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for index in layers:
        for name in names:
            key = f"model.layers.{index}.{name}"
            seen[key] = []
            hooks.append(
                model.get_submodule(key).register_forward_pre_hook(
                    lambda mod, args, key=key: seen[key].append(
                        args[0].reshape(-1, args[0].shape[-1])
                    )
                )
            )
    with torch.inference_mode():
        for sample in samples:
            model(sample.unsqueeze(0))
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(values).float() for name, values in seen.items()}


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bpe_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the calibration text, for tiny models that ship none.
    Special tokens `<unk>`, `<s>` (BOS), `</s>` (EOS) get ids 0, 1, 2, as in the tiny configs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from llmpress.corpora import load_text

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator([load_text("pydoc-calibration")[:200_000]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def run_uncompressed(runner, samples, on_layer=None) -> None:
    """The calibrated loop's calls on a LayerRunner (capture, then load, run and unload each
    layer, as llmpress.calibrated_layers makes them), nothing compressed: its hidden states
    are then the model's. `on_layer(index, layer)`: called with each resident layer."""
    runner.capture(samples)
    for index in range(len(runner.layers)):
        layer = runner.load_layer(index)
        if on_layer is not None:
            on_layer(index, layer)
        runner.forward_layer(index)
        runner.unload_layer(index)
