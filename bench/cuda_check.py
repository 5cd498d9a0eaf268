"""CUDA paths against the CPU ones, on a machine with a GPU (CI has none).

Builds random Llama models with SmolLM2's tokenizer (its files given with --tokenizer), then:
- data-free schemes: `--device cuda` must write the same bytes as `--device cpu`;
- calibrated schemes (FP8, W8A8_STATIC, NVFP4) and an FP8 KV cache: both devices must
  succeed, and their static scales agree to within the rounding of the compute dtype (bf16 on the GPU, float32 on
  the CPU);
- GPTQ (W4A16), AWQ and a mixed int8/int4 GPTQ run on both devices: every GPTQ module's
  output error below round-to-nearest's on the GPU, close to the CPU's;
- timing: a SmolLM2-shaped model (576 wide, 30 layers) calibrated with FP8 static on
  128 x 512 tokens, on each device.

    python bench/cuda_check.py --tokenizer DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from llmpress import compress

CALIBRATION = dict(dataset="pydoc-calibration", num_samples=16, seq_len=128, seed=0)


def build(path: Path, tokenizer: Path, hidden: int, layers: int, intermediate: int) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 192),
        head_dim=64,
        vocab_size=49152,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.05)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, path / name)
    return path


def tensors(out: Path) -> dict[str, torch.Tensor]:
    merged = {}
    for file in sorted(out.glob("*.safetensors")):
        merged.update(load_file(file))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp())
    small = build(work / "small", args.tokenizer, 256, 4, 512)
    failures = 0

    for scheme in ("W4A16", "W8A8", "FP8_DYNAMIC", "NVFP4A16"):
        outs = {}
        for device in ("cpu", "cuda"):
            outs[device] = work / f"{scheme}-{device}"
            compress(small, outs[device], scheme, device=device, progress=False)
        cpu, gpu = tensors(outs["cpu"]), tensors(outs["cuda"])
        same = cpu.keys() == gpu.keys() and all(torch.equal(cpu[k], gpu[k]) for k in cpu)
        failures += not same
        print(f"data-free {scheme:12s} cuda == cpu bytes: {same}")

    for scheme in ("FP8", "W8A8_STATIC", "NVFP4"):
        outs = {}
        for device in ("cpu", "cuda"):
            outs[device] = work / f"{scheme}-{device}"
            compress(small, outs[device], scheme, device=device, progress=False, **CALIBRATION)
        cpu, gpu = tensors(outs["cpu"]), tensors(outs["cuda"])
        keys = [k for k in cpu if k.endswith(("input_scale", "input_global_scale"))]
        worst = max(float((cpu[k].float() / gpu[k].float() - 1).abs().max()) for k in keys)
        # fp4 activations amplify the bf16-vs-float32 differences from layer to layer
        ok = cpu.keys() == gpu.keys() and worst < (0.15 if scheme == "NVFP4" else 0.05)
        failures += not ok
        print(f"calibrated {scheme:11s} {len(keys)} input scales, worst cpu/cuda gap {worst:.4f}")

    outs = {}
    for device in ("cpu", "cuda"):  # the KV cache calibrated with a data-free weight scheme
        outs[device] = work / f"kv-{device}"
        compress(
            small, outs[device], "FP8_DYNAMIC", kv_cache="fp8-head", device=device,
            progress=False, **CALIBRATION,
        )  # fmt: skip
    cpu, gpu = tensors(outs["cpu"]), tensors(outs["cuda"])
    keys = [k for k in cpu if k.endswith(("k_scale", "v_scale"))]
    worst = max(float((cpu[k].float() / gpu[k].float() - 1).abs().max()) for k in keys)
    ok = cpu.keys() == gpu.keys() and len(keys) == 8 and worst < 0.05
    failures += not ok
    print(f"kv-cache fp8-head, FP8_DYNAMIC: {len(keys)} k/v scales, worst cpu/cuda gap {worst:.4f}")

    # GPTQ (W4A16, groups of 64), AWQ and a mixed int8/int4 GPTQ run: both devices succeed,
    # and the reported output error of GPTQ is below round-to-nearest's for every module.
    for label, kwargs in (
        ("gptq W4A16", dict(scheme="W4A16", group_size=64, method="gptq")),
        ("awq W4A16", dict(scheme="W4A16", group_size=64, method="awq")),
        ("gptq mixed int8/int4", dict(method="gptq", groups=[
            {"scheme": "W8A16", "targets": ["re:.*down_proj"], "group_size": 64},
            {"scheme": "W4A16", "targets": ["Linear"], "group_size": 64}])),
    ):  # fmt: skip
        reports = {}
        for device in ("cpu", "cuda"):
            out = work / f"{label.replace(' ', '-').replace('/', '-')}-{device}"
            compress(small, out, device=device, progress=False, **kwargs, **CALIBRATION)
            reports[device] = json.loads((out / "llmpress.json").read_text())
        if kwargs["method"] == "gptq":
            gptq = reports["cuda"]["gptq"]
            ok = len(gptq) == 4 * 7 and all(r["loss"] < r["loss_rtn"] for r in gptq.values())
            gap = max(
                abs(reports["cpu"]["gptq"][m]["loss"] / r["loss"] - 1) for m, r in gptq.items()
            )
            detail = f"{len(gptq)} modules below RTN on cuda, worst cpu/cuda loss gap {gap:.3f}"
        else:
            sites = reports["cuda"]["smoothing"]["sites"]
            ok = len(sites) == 4 * 4
            detail = f"{len(sites)} sites smoothed on cuda"
        failures += not ok
        print(f"{label}: {detail}: {'ok' if ok else 'FAILED'}")

    if not args.skip_timing:
        shaped = build(work / "smollm2-shaped", args.tokenizer, 576, 30, 1536)
        for device in ("cuda", "cpu"):
            start = time.perf_counter()
            compress(
                shaped,
                work / f"timing-{device}",
                "FP8",
                device=device,
                progress=False,
                dataset="pydoc-calibration",
                num_samples=128,
                seq_len=512,
            )
            seconds = time.perf_counter() - start
            print(f"FP8 static, SmolLM2 shape, 128x512, --device {device}: {seconds:.1f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
