"""Probe for the next speed step of calibration (issue 4): one SmolLM2 decoder layer's
calibration forward (float32, fp8 quantize-dequantize on every Linear input), eager against
`torch.compile`, on layers 0-2 to see whether one compilation serves every layer.

    .venv/bin/python bench/compile_probe.py eager
    .venv/bin/python bench/compile_probe.py compile
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import SMOLLM2
from compressed_tensors.quantization import QuantizationArgs
from transformers import AutoTokenizer

from llmpress.data import calibration_set
from llmpress.runner import LayerRunner
from llmpress.served import quantize_static
from llmpress.source import ModelSource

FP8_INPUTS = QuantizationArgs(
    num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False
)


def main(mode: str) -> None:
    source = ModelSource.open(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    samples = calibration_set("pydoc-calibration", tokenizer, 16, 512, 0).samples
    runner = LayerRunner(source, dtype=torch.float32)
    runner.capture(samples)
    scale = torch.tensor([0.01])

    def quantize_input(module, args):
        return (quantize_static(args[0], scale, FP8_INPUTS), *args[1:])

    for index in (0, 1, 2):
        layer = runner.load_layer(index)
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        hooks = [m.register_forward_pre_hook(quantize_input) for m in linears]
        if mode == "compile":
            runner.layers[index] = torch.compile(layer, dynamic=False)
        for attempt in range(2):
            start = time.perf_counter()
            runner.forward_layer(index, update=False)
            print(f"{mode} layer {index} pass {attempt}: {time.perf_counter() - start:.2f} s")
        runner.layers[index] = layer
        for hook in hooks:
            hook.remove()
        runner.unload_layer(index)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "eager")
