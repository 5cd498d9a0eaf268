"""`llmpress inspect`: what a checkpoint holds, read back from its files alone: its config
groups and formats, bits per layer kind, size and compression ratio, the packing layout and the
compressed-tensors that reads it, the sparsity as stored, and the manifest's per-module reports.
The write side (quantization_config, recipe.yaml) is llmpress.checkpoint."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
)
from compressed_tensors.utils import match_targets

from llmpress.errors import LlmpressError
from llmpress.packing import layout_of
from llmpress.source import SAFETENSORS_DTYPES


def read_quantization_config(checkpoint: Path) -> dict:
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        raise LlmpressError(f"{checkpoint} has no config.json; is it a model directory?")
    config = json.loads(config_file.read_text())
    qconfig = config.get("quantization_config")
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        raise LlmpressError(f"{checkpoint} is not a compressed-tensors checkpoint")
    return qconfig


def check_reader(checkpoint: Path, reader_version: str | None = None) -> None:
    """Refuse, with the fix, to read odd-bit packing written for another compressed-tensors."""
    qconfig = read_quantization_config(checkpoint)
    reader_version = reader_version or compressed_tensors.__version__
    written = qconfig.get("version") or "0.0"
    layout = written_layout(qconfig)
    odd = sorted(
        {
            group["weights"]["num_bits"]
            for group in qconfig.get("config_groups", {}).values()
            if group.get("weights")
            and group["weights"]["num_bits"] in (3, 5, 6, 7)
            and group.get("format", qconfig.get("format")) == "pack-quantized"
        }
    )
    if odd and layout != layout_of(reader_version):
        raise LlmpressError(
            f"{checkpoint.name} packs {odd[0]}-bit weights in the {layout} layout (written with "
            f"compressed-tensors {written}), but compressed-tensors {reader_version} reads the "
            f"{layout_of(reader_version)} layout; install compressed-tensors "
            f"{'>=0.18' if layout == 'dense' else '<0.18'} to read it, or re-compress with "
            f"--packing {layout_of(reader_version)}"
        )


def written_layout(qconfig: dict) -> str:
    return qconfig.get("int_packing") or layout_of(qconfig.get("version") or "0.0")


def summarize(checkpoint: Path) -> dict:
    """Groups, formats, bits per layer, size on disk and compression ratio of a checkpoint,
    and for a pruned one its sparsity as stored (`verify_sparsity`)."""
    from safetensors import safe_open

    if _pruned_only(checkpoint):  # a plain dense model: no quantization_config
        qconfig = {"format": CompressionFormat.dense.value, "version": None}
    else:
        qconfig = read_quantization_config(checkpoint)
    groups = {}
    for name, group in qconfig.get("config_groups", {}).items():
        scheme = QuantizationScheme.model_validate(group)
        weights = scheme.weights
        groups[name] = {
            "targets": scheme.targets,
            "format": group.get("format") or qconfig.get("format"),
            "weights": _describe_args(weights) if weights else "16-bit",
            "input_activations": _describe_args(scheme.input_activations)
            if scheme.input_activations
            else "16-bit",
        }
    files = sorted(checkpoint.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    params: dict[str, dict[str, tuple[str, list[int]]]] = defaultdict(dict)
    for file in files:
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                view = reader.get_slice(key)
                module, _, param = key.rpartition(".")
                shape = view.get_shape()
                if param == "weight_shape":  # the unpacked shape is stored as values
                    shape = reader.get_tensor(key).tolist()
                params[module][param] = (view.get_dtype(), shape)
    layers: dict[str, Counter] = defaultdict(Counter)
    dense_bytes = 0
    for module, found in params.items():
        stored = _stored_weight(found, _group_bits(module, qconfig.get("config_groups", {})))
        if stored is None:  # a 16-bit module: count what it holds
            dense_bytes += sum(_nbytes(dtype, shape) for dtype, shape in found.values())
            continue
        label, elements = stored
        layers[_kind(module)][label] += 1
        dense_bytes += elements * 2
        dense_bytes += sum(_nbytes(*found[p]) for p in found if p == "bias")
    return {
        "checkpoint": str(checkpoint),
        "format": qconfig.get("format"),
        "compressed_tensors_version": qconfig.get("version"),
        "packing_layout": written_layout(qconfig),
        "groups": groups,
        "ignore": qconfig.get("ignore", []),
        "kv_cache": _describe_args(QuantizationArgs.model_validate(qconfig["kv_cache_scheme"]))
        if qconfig.get("kv_cache_scheme")
        else None,
        "quantized_layers": sum(sum(c.values()) for c in layers.values()),
        "layers_by_kind": {k: dict(v) for k, v in sorted(layers.items())},
        "size_bytes": size,
        "bf16_equivalent_bytes": dense_bytes,
        "compression_ratio": dense_bytes / size if size else 0.0,
        "gptq": _manifest_section(checkpoint, "gptq"),
        "smoothing": _manifest_section(checkpoint, "smoothing"),
        "sparsity": verify_sparsity(checkpoint, qconfig),
    }


def _pruned_only(checkpoint: Path) -> bool:
    """An llmpress output that only pruned: stored dense, without quantization_config."""
    config_file = checkpoint / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    return "quantization_config" not in config and _manifest_section(checkpoint, "sparsity")


def verify_sparsity(checkpoint: Path, qconfig: dict) -> dict | None:
    """The pruning the manifest records, checked against the stored weights: each pruned
    module's weight as its readers reconstruct it (quantized ones dequantized by
    compressed-tensors), its fraction of zeros, and for N:M masks every block of every row."""
    from safetensors import safe_open

    from llmpress.served import dequantized_weight
    from llmpress.sparsity import Structure, n_m_violations, zero_fraction

    recorded = _manifest_section(checkpoint, "sparsity")
    if not recorded:
        return None
    structure = Structure.parse(recorded["structure"])
    where = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            where.update(dict.fromkeys(reader.keys(), file))  # noqa: SIM118
    groups = qconfig.get("config_groups") or {}
    measured, broken, sizes = {}, [], {}
    for name in recorded["modules"]:
        keys = [k for k in (f"{name}.{p}" for p in _WEIGHT_PARAMS) if k in where]
        if not keys:
            raise LlmpressError(f"{checkpoint.name}: the pruned module {name} has no weight")
        state = {}
        for key in keys:
            with safe_open(where[key], framework="pt") as reader:
                state[key.rpartition(".")[2]] = reader.get_tensor(key)
        group = _group_of(name, groups)
        if "weight_scale" not in state or group is None:  # stored dense: not quantized
            weight = state["weight"]
        else:
            scheme = QuantizationScheme.model_validate(group)
            scheme.format = scheme.format or qconfig.get("format")
            weight = dequantized_weight(state, scheme, torch.float32)
        measured[name] = zero_fraction(weight)
        sizes[name] = weight.numel()
        if n_m_violations(weight, structure):
            broken.append(name)
    total = sum(sizes.values())
    return {
        "method": recorded["method"],
        "structure": structure.label,
        "modules": len(measured),
        "global_sparsity": sum(measured[n] * sizes[n] for n in sizes) / total,
        "recorded_global_sparsity": recorded["global_sparsity"],
        "lowest": min(measured.values()),
        "highest": max(measured.values()),
        "by_kind": _mean_by_kind(measured),
        "pattern_holds": not broken if structure.structured else None,
        "broken": broken,
    }


# A stored module's weight and its quantization parameters.
_WEIGHT_PARAMS = ("weight", "weight_packed", "weight_scale", "weight_zero_point",
                  "weight_shape", "weight_global_scale", "weight_g_idx")  # fmt: skip


def _mean_by_kind(measured: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, list[float]] = defaultdict(list)
    for name, value in measured.items():
        kinds[_kind(name)].append(value)
    return {k: sum(v) / len(v) for k, v in sorted(kinds.items())}


def _manifest_section(checkpoint: Path, section: str) -> dict | None:
    """A report from llmpress.json (GPTQ's per module, smoothing's per site), if written."""
    manifest = checkpoint / "llmpress.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get(section)


def _describe_args(args) -> str:
    kind = f"{args.type}{args.num_bits}"
    detail = args.strategy
    if args.group_size:
        detail += f" {args.group_size}"
    if args.block_structure:
        detail += f" {args.block_structure[0]}x{args.block_structure[1]}"
    sym = "sym" if args.symmetric else "asym"
    when = "at run time" if args.dynamic else "static"
    return f"{kind} {detail} {sym} ({when})"


def _kind(module: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", module)


def _nbytes(dtype: str, shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * SAFETENSORS_DTYPES[dtype].itemsize


def _group_bits(module: str, config_groups: dict) -> int | None:
    """The weight bits of the config group a reader gives `module`."""
    group = _group_of(module, config_groups)
    return (group.get("weights") or {}).get("num_bits") if group else None


def _group_of(module: str, config_groups: dict) -> dict | None:
    """The config group a reader gives `module` (every stored quantized module is a Linear):
    compressed-tensors' own most-specific-target match, as the plan."""
    owner = {t: g for g in reversed(config_groups.values()) for t in g.get("targets", [])}
    matched = match_targets(module, _A_LINEAR, list(owner))
    return owner[matched[0]] if matched else None


def _stored_weight(
    found: dict[str, tuple[str, list[int]]], bits: int | None = None
) -> tuple[str, int] | None:
    """How a module's weight is stored (`bits`: its group's, for packed ints), and how many
    elements it has; None when 16-bit."""
    if "weight_packed" in found:
        dtype, shape = found["weight_packed"]
        if dtype == "I32":  # ints packed into int32 words; the true shape is stored beside it
            out_f, in_f = found["weight_shape"][1]
            return f"int{bits or ''} packed in int32", out_f * in_f
        return "fp4 packed in uint8", shape[0] * shape[1] * 2
    if "weight" in found and found["weight"][0] in ("F8_E4M3", "I8"):
        dtype, shape = found["weight"]
        return ("fp8" if dtype == "F8_E4M3" else "int8"), shape[0] * shape[1]
    return None


# What every quantized module of a checkpoint is, for target matching by class name.
_A_LINEAR = torch.nn.Linear(1, 1, device="meta")
