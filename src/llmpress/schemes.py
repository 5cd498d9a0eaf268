"""Scheme presets: compressed-tensors' own, plus the WnA16 family it gained after 0.17.

Every preset is built by a function from compressed-tensors' `QuantizationArgs`, so the arguments
are identical to the ones llm-compressor and vLLM use. The installed compressed-tensors may lack
some names (0.17 has no W3A16); those are built here with the same arguments 0.20 uses.
"""

from __future__ import annotations

from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

from llmpress.errors import LlmpressError

# One line per preset for `llmpress schemes`; also the list of schemes this release supports.
DESCRIPTIONS: dict[str, str] = {
    "W4A16": "int4 weights, symmetric, group 128; 16-bit activations",
    "W4A16_ASYM": "int4 weights, asymmetric (zero points), group 128; 16-bit activations",
    "W8A16": "int8 weights, symmetric, group 128; 16-bit activations",
    "W2A16": "int2 weights, symmetric, group 128; 16-bit activations",
    "W3A16": "int3 weights, symmetric, group 128; 16-bit activations",
    "W5A16": "int5 weights, symmetric, group 128; 16-bit activations",
    "W6A16": "int6 weights, symmetric, group 128; 16-bit activations",
    "W7A16": "int7 weights, symmetric, group 128; 16-bit activations",
    "W8A8": "int8 weights per channel; int8 activations, per token, computed at run time",
    "W4A8": "int4 weights, group 128; int8 activations per token at run time (pack-quantized)",
    "W4AFP8": "int4 weights, group 128; fp8 activations per token at run time (pack-quantized)",
    "FP8_DYNAMIC": "fp8 e4m3 weights per channel; fp8 activations per token at run time",
    "FP8_BLOCK": "fp8 e4m3 weights in 128x128 blocks; fp8 activations per 128-group at run time",
    "NVFP4A16": "fp4 e2m1 weights, group 16 with fp8 scales and a global scale; 16-bit acts",
    "MXFP4A16": "fp4 e2m1 weights, group 32 with e8m0 (power-of-two) scales; 16-bit acts",
    "MXFP4": "MXFP4 weights; MXFP4 activations, group 32, at run time",
    "MXFP8A16": "fp8 e4m3 weights, group 32 with e8m0 scales; 16-bit activations",
    "MXFP8": "MXFP8 weights; MXFP8 activations, group 32, at run time",
}
# Schemes with static activation scales: compress needs calibration text (--dataset).
CALIBRATED: dict[str, str] = {
    "FP8": "fp8 e4m3 weights per tensor; fp8 activations per tensor, static scale (--dataset)",
    "W8A8_STATIC": "int8 weights per channel; int8 activations per tensor, static scale "
    "(--dataset)",
    "NVFP4": "NVFP4 weights; fp4 activations, group 16 at run time under a static global "
    "scale (--dataset)",
}
DATA_FREE = dict(DESCRIPTIONS)
DESCRIPTIONS.update(CALIBRATED)

# Weight+activation int4 schemes that vLLM only serves from the packed layout: compressed-tensors
# would infer an unpacked format for them because they quantize activations.
PACKED_WITH_ACTIVATIONS = {"W4A8", "W4AFP8"}

# compressed-tensors names that differ from ours.
_CT_NAMES = {"W8A8": "INT8"}


def _int_weight_only(num_bits: int) -> dict:
    """WnA16 as compressed-tensors 0.20 defines it: symmetric int, group 128."""
    return {
        "weights": QuantizationArgs(
            num_bits=num_bits,
            type=QuantizationType.INT,
            strategy=QuantizationStrategy.GROUP,
            group_size=128,
            symmetric=True,
            dynamic=False,
        )
    }


def _int8_static() -> dict:
    """W8A8 with one static, symmetric input scale per tensor (vLLM's static int8 path)."""
    args = preset_args("W8A8")
    args["input_activations"] = QuantizationArgs(
        num_bits=8,
        type=QuantizationType.INT,
        strategy=QuantizationStrategy.TENSOR,
        symmetric=True,
        dynamic=False,
    )
    return args


def scheme_names() -> list[str]:
    return list(DESCRIPTIONS)


def data_free_scheme_names() -> list[str]:
    return list(DATA_FREE)


def preset_args(name: str) -> dict:
    """Fresh `QuantizationArgs` for a preset (never a shared object)."""
    key = name.upper()
    if key not in DESCRIPTIONS:
        raise LlmpressError(
            f"unknown scheme {name!r}; choose one of {', '.join(DESCRIPTIONS)} "
            "(`llmpress schemes` describes each)"
        )
    if key == "W8A8_STATIC":
        return _int8_static()
    ct_key = _CT_NAMES.get(key, key)
    if ct_key in PRESET_SCHEMES:
        preset = PRESET_SCHEMES[ct_key]
        return {field: args.model_copy(deep=True) for field, args in preset.items()}
    return _int_weight_only(int(key[1]))


def build_scheme(
    name: str, targets: list[str], group_size: int | None = None
) -> QuantizationScheme:
    """A preset as a compressed-tensors scheme, optionally with another weight group size."""
    args = preset_args(name)
    weights: QuantizationArgs = args["weights"]
    if group_size is not None:
        if weights.strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
            raise LlmpressError(
                f"--group-size applies to group-wise schemes; {name} quantizes weights "
                f"per {weights.strategy}"
            )
        if weights.type == QuantizationType.FLOAT and group_size != weights.group_size:
            raise LlmpressError(
                f"{name} fixes the group size at {weights.group_size} (its scale format "
                "depends on it); drop --group-size"
            )
        args["weights"] = weights.model_copy(update={"group_size": group_size})
        args["weights"] = QuantizationArgs.model_validate(args["weights"].model_dump())
    fmt = (
        CompressionFormat.pack_quantized.value if name.upper() in PACKED_WITH_ACTIVATIONS else None
    )
    return QuantizationScheme(targets=list(targets), format=fmt, **args)


def weight_bits(scheme: QuantizationScheme) -> int:
    return scheme.weights.num_bits if scheme.weights is not None else 16
