"""Load checkpoints with whatever compressed-tensors is importable; dump the weights it rebuilds.

Run as a subprocess with PYTHONPATH pointing at another compressed-tensors release, so the
same checkpoint can be read by two versions side by side.
Usage: ct_reader.py OUT.safetensors CHECKPOINT...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import compressed_tensors
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig


def main(out: str, checkpoints: list[str]) -> None:
    tensors, errors = {}, {}
    for checkpoint in checkpoints:
        tag = Path(checkpoint).name
        try:
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint,
                dtype=torch.bfloat16,
                quantization_config=CompressedTensorsConfig(run_compressed=False),
            )
        except Exception as exc:  # the error text is the result here
            errors[tag] = f"{type(exc).__name__}: {exc}"
            continue
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and hasattr(module, "quantization_scheme"):
                tensors[f"{tag}/{name}"] = module.weight.detach().contiguous()
    save_file(tensors, out)
    print(json.dumps({"version": compressed_tensors.__version__, "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
