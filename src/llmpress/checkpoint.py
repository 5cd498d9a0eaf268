"""What a checkpoint says about itself: `quantization_config` and `recipe.yaml` (reading it
back is llmpress.inspect).

The config is written from the plan (never rebuilt from a model), through compressed-tensors'
own pydantic `QuantizationConfig`, so every field validates exactly as vLLM will read it.
"""

from __future__ import annotations

import compressed_tensors
import yaml
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationConfig,
)

from llmpress.algorithms import DEFAULT_QUANTIZER, smoother_of
from llmpress.config import CompressOptions
from llmpress.packing import layouts_differ
from llmpress.plan import Plan
from llmpress.quantize import scheme_format


def quantization_config(plan: Plan, layout: str, sparsity: dict | None = None) -> dict:
    """`config.json`'s `quantization_config`, as compressed-tensors itself writes it.

    For 3, 5, 6 and 7-bit weights, `int_packing` records the layout written (readers that
    predate it ignore unknown keys), since the compressed-tensors version alone cannot say.
    A pruned model (`sparsity`: `manifest.sparsity_report`) is stored dense, and its
    `sparsity_config` says so, with the structure and the global sparsity; it names no
    targets, which vLLM refuses since sparse formats were dropped (the manifest lists the
    modules).
    """
    groups = {}
    for group in plan.groups:
        scheme = group.scheme.model_copy(deep=True)
        scheme.format = scheme_format(scheme)
        groups[group.name] = scheme
    formats = {scheme.format for scheme in groups.values()} or {CompressionFormat.dense.value}
    qconfig = QuantizationConfig(
        config_groups=groups,
        # Several formats: each group's own `format` says how its modules are stored.
        format=formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value,
        quantization_status="compressed",
        ignore=list(plan.ignored),
        kv_cache_scheme=plan.kv_cache,
    )
    data = qconfig.model_dump(mode="json", exclude={"quant_method"})
    if any(s.weights.type == "int" and layouts_differ(s.weights.num_bits) for s in groups.values()):
        data["int_packing"] = layout
    if loads_dense(groups.values(), plan.kv_cache is not None):
        data["dequantize"] = True
    sparsity_config = {}
    if sparsity is not None:
        sparsity_config = {
            "format": CompressionFormat.dense.value,
            "global_sparsity": sparsity["global_sparsity"],
            "sparsity_structure": sparsity["structure"],
            "targets": None,
            "ignore": None,
        }
    return {
        # compressed-tensors records its own version here; the packing layout follows from it.
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": sparsity_config,
        "transform_config": {},
        **data,
    }


def loads_dense(schemes, kv_cache: bool) -> bool:
    """Whether transformers should load the checkpoint dequantized (`"dequantize": true`).

    Packed asymmetric zero points do not load in transformers >= 5.23 with
    compressed-tensors >= 0.18: the latter sizes the model's zero point unpacked when it
    compresses the model on the meta device ([out, groups] where the checkpoint holds
    [out / 8, groups]), and the former stopped ignoring that mismatch ("weight_zero_point
    ... size mismatch"); llm-compressor's checkpoints fail alike. Loaded dequantized, the
    weights are the same numbers a compressed load decompresses at its first forward, so a
    model quantized only in its weights computes the same logits (bit for bit, every version
    pair from 5.19/0.17 up); vLLM and compressed-tensors ignore the key. A model that also
    quantizes activations or its KV cache would lose them dequantized: left as it is.
    """
    schemes = list(schemes)
    asymmetric_packed = any(
        s.format == CompressionFormat.pack_quantized.value
        and s.weights is not None
        and not s.weights.symmetric
        for s in schemes
    )
    weights_only = all(
        s.input_activations is None and s.output_activations is None for s in schemes
    )
    return asymmetric_packed and weights_only and not kv_cache


def recipe_yaml(plan: Plan, options: CompressOptions) -> str:
    """What was done, in llm-compressor's recipe format so either tool can re-run it. Where
    the groups' methods differ (several algorithms in one run), the AWQ groups are the
    AWQModifier's own config groups and the others the quantization modifier's."""
    several = len(set(options.methods)) > 1
    own_awq, quantized = {}, {}
    for planned, spec, method in zip(plan.groups, options.scheme_groups, options.methods,
                                     strict=True):  # fmt: skip
        group = {
            "targets": list(spec.targets),
            "weights": planned.scheme.weights.model_dump(mode="json", exclude_defaults=True),
        }
        if planned.scheme.input_activations is not None:
            group["input_activations"] = planned.scheme.input_activations.model_dump(
                mode="json", exclude_defaults=True
            )
        (own_awq if several and _rounds_itself(method) else quantized)[planned.name] = group
    specs = [g for g, m in zip(options.scheme_groups, options.methods, strict=True)
             if not (several and _rounds_itself(m))]  # fmt: skip
    modifier = {
        "targets": list(dict.fromkeys(t for g in specs for t in g.targets)),
        "ignore": list(options.ignore),
        "config_groups": quantized,
    }
    if plan.kv_cache is not None:
        modifier["kv_cache_scheme"] = plan.kv_cache.model_dump(mode="json", exclude_defaults=True)
    quantizer = options.solver or DEFAULT_QUANTIZER
    modifier = quantizer.recipe_args(options, modifier)
    modifiers = {}
    if (smoother := options.smoother) is not None:
        # As llm-compressor 0.14 spells AWQ: it smooths, the quantization modifier after it
        # quantizes (its scheme is what AWQ's search rounds to).
        modifiers[smoother.modifier] = smoother.recipe_args(options)
        if own_awq:
            modifiers[smoother.modifier].update(ignore=list(options.ignore), config_groups=own_awq)
    if quantized:
        modifiers[quantizer.modifier] = modifier
    recipe = {}
    if plan.sparsity is not None:
        recipe["sparsity_stage"] = {"sparsity_modifiers": _pruning_modifier(plan, options)}
    if modifiers:
        recipe["quant_stage"] = {"quant_modifiers": modifiers}
    header = (
        f"# written by llmpress: {options.label}, method "
        f"{'/'.join(options.method_names)}, "
        f"observer {options.observer}\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def _pruning_modifier(plan: Plan, options: CompressOptions) -> dict:
    """The pruning as llm-compressor's modifier spells it."""
    structure = plan.sparsity.structure
    sparsity = options.sparsity
    if structure.structured:
        sparsity = structure.sparsity
    elif sparsity is None:
        sparsity = 0.5
    targets = options.sparsity_targets or tuple(
        dict.fromkeys(t for g in options.scheme_groups for t in g.targets)
    )
    ignore = options.sparsity_ignore if options.sparsity_ignore is not None else options.ignore
    args = {
        "sparsity": list(sparsity) if isinstance(sparsity, tuple) else sparsity,
        "mask_structure": structure.label if structure.structured else "0:0",
        "targets": list(targets or ("Linear",)),
        "ignore": list(ignore),
    }
    return {options.pruner.modifier: options.pruner.recipe_args(options, args)}


def _rounds_itself(method: str) -> bool:
    """A group whose smoother also rounds its weights (AWQ): its modifier's own group."""
    smoother = smoother_of(method)
    return smoother is not None and smoother.quantizes_smoothed
