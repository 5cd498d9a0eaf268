"""vLLM's view of llmpress checkpoints, run as a child process of tests/test_vllm.py.

vLLM's import, its process tree and its global patches (it replaces torch.set_num_threads)
stay out of pytest. Both modes print one JSON object on a line of its own, prefixed by RESULT.

  generate CHECKPOINT... --prompts-json FILE --max-tokens N [--attention]
      greedy token ids per prompt, served by vLLM's CPU build: {checkpoint: [[ids], ...]};
      with --attention {checkpoint: {"tokens": [[ids], ...], "attention": {layer: {...}}}};
      a checkpoint vLLM cannot load or run here: {checkpoint: {"error": "Type: message"}},
      and the next one is served as if it had not been there
  kernels OP...
      whether vLLM's CPU kernels for this CPU (the library vLLM itself picks by ISA) have
      each custom op, and vLLM's refusal of an fp8 KV cache here (its CPU attention's own
      check, None where it takes one): {"ops": {op: true/false}, "fp8_kv_cache": str | None}
  schemes CHECKPOINT... [--capability 9.0]
      the CompressedTensorsScheme vLLM picks for each quantized Linear, without a GPU:
      {checkpoint: {vllm_layer: scheme class name or "ERROR: message"}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

# Set before vLLM is imported. The engine runs in this process: with multiprocessing on, the
# spawned EngineCore and worker each re-import vLLM (~30 s per LLM on 2 cores, not ~5 s).
# One OpenMP thread: with 2, threads contend for the 2 cores and decoding is 10x slower.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}
KV_CACHE_BYTES = 256 * 2**20  # ~11k tokens for SmolLM2; the default would size it from RAM
MARK = "RESULT "


def generate(
    checkpoints: list[str], prompts: list[Any], max_tokens: int, attention: bool = False
) -> dict[str, Any]:
    """Greedy decoding; one LLM at a time, all prompts batched. Prompts: str or token ids.
    `attention`: also what each attention layer holds once loaded, {"tokens", "attention"}."""
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    out: dict[str, Any] = {}
    for checkpoint in checkpoints:
        llm = None
        try:
            llm = LLM(
                model=checkpoint,
                dtype="bfloat16",
                enforce_eager=True,  # no torch.compile / graph capture: minutes on 2 cores
                max_model_len=512,
                max_num_seqs=len(inputs),
                kv_cache_memory_bytes=KV_CACHE_BYTES,
            )
            results = llm.generate(inputs, params, use_tqdm=False)
            out[checkpoint] = [list(r.outputs[0].token_ids) for r in results]
            if attention:
                (layers,) = llm.apply_model(_attention_layers)
                out[checkpoint] = {"tokens": out[checkpoint], "attention": layers}
        except Exception as error:  # reported per checkpoint; the test asserts
            out[checkpoint] = {"error": f"{type(error).__name__}: {error}"}
        finally:
            # The engine is shut down now, before the next one starts: left to a later
            # collection, its shutdown tears down the parallel groups the next one set up
            # ("pipeline model parallel group is not initialized").
            del llm
            gc.collect()
    return out


def kernels(ops: list[str]) -> dict[str, Any]:
    """Which custom ops vLLM's CPU kernels register on this CPU, loaded as vLLM loads them
    (`_C_AVX2`, `_C_AVX512` or `_C`, chosen by the CPU's ISA), and whether its CPU attention
    takes an fp8 KV cache here (asked as for SmolLM2: bf16, head size 64)."""
    import torch
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    current_platform.import_kernels()
    try:
        _get_attn_isa(torch.bfloat16, block_size=32, head_size=64, kv_cache_dtype="fp8")
        refusal = None
    except NotImplementedError as error:
        refusal = str(error)
    return {"ops": {op: hasattr(torch.ops._C, op) for op in ops}, "fp8_kv_cache": refusal}


def _attention_layers(model: Any) -> dict[str, dict[str, Any]]:
    """Each attention layer's KV-cache dtype and the k/v scales its kernels use."""
    from vllm.model_executor.layers.attention.attention import Attention

    return {
        name: {
            "kv_cache_dtype": module.kv_cache_dtype,
            "k_scale": module._k_scale_float,
            "v_scale": module._v_scale_float,
        }
        for name, module in model.named_modules()
        if isinstance(module, Attention)
    }


def _pretend_gpu(capability: str) -> None:
    """Make vLLM's capability-gated choices as on that GPU, and skip kernel selection.

    Which scheme vLLM picks depends on the quantization config and the device capability
    (W4AFP8 maps on sm90 only; FP8 W8A8 needs >= 89), and the CPU platform reports no
    capability, so it reports `capability` instead: one classmethod, nothing else. Kernel
    selection (Marlin, CUTLASS, FlashInfer...) needs a GPU and CUDA ops, and the NVFP4, MXFP4
    and FP8 schemes do it in __init__, so `choose_mp_linear_kernel` and `init_*_kernel`, as
    the scheme modules see them, return a stub. The rest runs unchanged: the scheme choice,
    its validation (group size, block shape) and create_weights, whose parameters are what
    vLLM's weight loader fills from the checkpoint's tensors.
    """
    from unittest import mock

    from vllm.model_executor.layers.quantization.compressed_tensors import schemes
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    major, minor = (int(part) for part in capability.split("."))
    device = DeviceCapability(major, minor)
    type(current_platform).get_device_capability = classmethod(lambda cls, device_id=0: device)
    kernel = mock.MagicMock(__name__="StubKernel")
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(schemes.__name__ + "."):
            for name in dir(module):
                if name == "choose_mp_linear_kernel" or (
                    name.startswith("init_") and name.endswith("_kernel")
                ):
                    setattr(module, name, lambda *args, **kwargs: kernel)


def _single_process_group() -> None:
    """A world of one (gloo): vLLM's parameters read their tensor-parallel rank at creation."""
    import tempfile

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    init_file = Path(tempfile.mkdtemp()) / "dist"
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"file://{init_file}", 0, backend="gloo")
        initialize_model_parallel(1, 1)


def _linears(checkpoint: Path) -> dict[str, tuple[int, int]]:
    """(in, out) features of every nn.Linear, from the model's config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _stored(checkpoint: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensor shapes of the checkpoint's quantized modules (those with a weight_scale)."""
    from safetensors import safe_open

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118
                module, _, param = key.rpartition(".")
                shape = tuple(reader.get_slice(key).get_shape())
                modules.setdefault(module, {})[param] = shape
    return {module: params for module, params in modules.items() if "weight_scale" in params}


def _check_layer(
    quant: Any,
    name: str,
    parts: dict[str, dict[str, tuple[int, ...]]],
    linears: dict[str, tuple[int, int]],
) -> str:
    """Scheme for one vLLM layer (parts: the checkpoint modules fused into it), found as vLLM's
    linear layers find it: get_scheme, then create_weights. Every stored tensor then needs a
    parameter of its name (vLLM's loader fails on any other) and, stacked along the output
    dimension, of its shape."""
    import torch

    layer = torch.nn.Module()
    # Targets name module classes ("Linear"); vLLM's QKVParallelLinear etc. match as nn.Linear.
    scheme = quant.get_scheme(layer=torch.nn.Linear(1, 1), layer_name=name)
    if scheme is None:
        return "ERROR: not quantized by vLLM (ignored or untargeted)"
    in_features = {linears[part][0] for part in parts}
    if len(in_features) != 1:
        return f"ERROR: fused parts differ in input size: {in_features}"
    (size_in,) = in_features
    sizes = [linears[part][1] for part in parts]
    scheme.create_weights(
        layer=layer,
        input_size=size_in,
        input_size_per_partition=size_in,
        output_partition_sizes=sizes,
        output_size=sum(sizes),
        params_dtype=torch.bfloat16,
        weight_loader=lambda *args, **kwargs: None,
    )
    params = dict(layer.named_parameters())
    for tensor in sorted({tensor for tensors in parts.values() for tensor in tensors}):
        if tensor not in params:
            return (
                f"ERROR: no vLLM parameter for {tensor} of {sorted(parts)} (has {sorted(params)})"
            )
        shapes = [tensors[tensor] for tensors in parts.values()]
        expected = tuple(params[tensor].shape)
        dim = getattr(params[tensor], "output_dim", None)
        if len(shapes) > 1 and dim is None:
            continue  # per-partition scalars or whole copies (weight_shape): loaded per shard
        stored = list(shapes[0])
        if dim is not None:  # fused parts are stacked along the output dimension
            stored[dim] = sum(shape[dim] for shape in shapes)
        if tuple(stored) != expected:
            return f"ERROR: {tensor} of {sorted(parts)} stored {shapes}, vLLM expects {expected}"
    return type(scheme).__name__


def schemes(checkpoints: list[str], capability: str) -> dict[str, dict[str, str]]:
    """Map every quantized module of each checkpoint to the scheme vLLM builds for it."""
    import torch
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.models.registry import ModelRegistry

    _pretend_gpu(capability)
    _single_process_group()
    out = {}
    for checkpoint in map(Path, checkpoints):
        config = json.loads((checkpoint / "config.json").read_text())
        quant = CompressedTensorsConfig.from_config(config["quantization_config"])
        model_cls = ModelRegistry._try_load_model_cls(config["architectures"][0])
        # What SupportsQuant.__new__ does when vLLM builds the model.
        if (mapper := getattr(model_cls, "hf_to_vllm_mapper", None)) is not None:
            quant.apply_vllm_mapper(mapper.get_rename_mapper())
        packed = getattr(model_cls, "packed_modules_mapping", {})
        quant.packed_modules_mapping.update(packed)
        fused = {part: whole for whole, parts in packed.items() for part in parts}
        layers: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {}
        for module, tensors in _stored(checkpoint).items():
            parent, _, leaf = module.rpartition(".")
            layers.setdefault(f"{parent}.{fused.get(leaf, leaf)}", {})[module] = tensors
        linears = _linears(checkpoint)
        # Some schemes read the model dtype from the current config, as when serving.
        vllm_config = VllmConfig(model_config=ModelConfig(model=str(checkpoint), dtype="bfloat16"))
        result = {}
        with set_current_vllm_config(vllm_config), torch.device("cpu"):
            for name, parts in sorted(layers.items()):
                try:
                    result[name] = _check_layer(quant, name, parts, linears)
                except Exception as error:  # reported per layer; the test asserts
                    result[name] = f"ERROR: {type(error).__name__}: {error}"
        out[str(checkpoint)] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    gen = modes.add_parser("generate")
    gen.add_argument("checkpoints", nargs="+")
    gen.add_argument("--prompts-json", type=Path, required=True)
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--attention", action="store_true", help="also report attention layers")
    sch = modes.add_parser("schemes")
    sch.add_argument("checkpoints", nargs="+")
    sch.add_argument("--capability", default="9.0", help="GPU to decide for; 9.0 = H100/H200")
    ker = modes.add_parser("kernels")
    ker.add_argument("ops", nargs="+")
    args = parser.parse_args()
    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    if args.mode == "generate":
        prompts = json.loads(args.prompts_json.read_text())
        result: Any = generate(args.checkpoints, prompts, args.max_tokens, args.attention)
    elif args.mode == "kernels":
        result = kernels(args.ops)
    else:
        result = schemes(args.checkpoints, args.capability)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
