"""Round-to-nearest quantization of one layer's weights into compressed-tensors' stored form.

Scales come from an observer; packing comes from compressed-tensors' own compressor for the
scheme's format, so the bytes are exactly what its decompressor (and vLLM) expect.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy

from llmpress.errors import LlmpressError
from llmpress.fastpath import fast_compress
from llmpress.observers import NonFiniteWeight, global_scale, weight_qparams
from llmpress.packing import Layout, installed_layout, layouts_differ


def scheme_format(scheme: QuantizationScheme) -> str:
    """The compressed-tensors format a scheme is written in (pinned, or inferred as CT does)."""
    if scheme.format is not None:
        return str(scheme.format)
    return infer_module_format(torch.nn.Linear, scheme).value


_CHECK_CHUNK = 1 << 22  # elements: isfinite's temporaries stay a few MB for any tensor size


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    chunks = tensor.reshape(-1).split(_CHECK_CHUNK)
    # min and max propagate NaN and show Inf; a reduction is 20x faster than isfinite's mask.
    if not all(bool(torch.isfinite(torch.stack(torch.aminmax(c))).all()) for c in chunks):
        bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in chunks)
        raise LlmpressError(
            f"{name} holds {bad} NaN/Inf values; the input model is corrupt or was saved "
            "after a diverged step — fix or re-export it before compressing"
        )


def _qparams(name, weight, args, observer, gscale):
    try:
        return weight_qparams(weight, args, observer, gscale)
    except NonFiniteWeight:
        check_finite(f"{name}.weight", weight)  # counts the bad values for the message
        raise


def layer_states(
    weights: dict[str, torch.Tensor],
    scheme: QuantizationScheme,
    fused: dict[str, tuple[str, ...]],
    observer: str = "minmax",
    device: str = "cpu",
) -> dict[str, dict[str, torch.Tensor]]:
    """Round-to-nearest parameters of several modules of one layer, by module name: each a
    state (`weight`, `weight_scale`, `weight_zero_point`, ...) for `pack_states`.

    All modules are given together so that fused siblings (q/k/v, gate/up) can share NVFP4's
    global scale.
    """
    args = scheme.weights
    on_device = {name: w.to(device) for name, w in weights.items()}
    gscales = global_scales(on_device, scheme, fused)
    out = {}
    for name, weight in on_device.items():
        gscale = gscales.get(name)
        scale, zero_point = _qparams(name, weight, args, observer, gscale)
        if args.scale_dtype is None:
            # Stored scales take the weight's dtype (what vLLM and llm-compressor write);
            # quantizing with the rounded scale keeps stored bytes and reference identical.
            scale = scale.to(weight.dtype)
        out[name] = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
        if gscale is not None:
            out[name]["weight_global_scale"] = gscale.clone()  # one tensor per module on disk
    return out


def global_scales(
    weights: dict[str, torch.Tensor],
    scheme: QuantizationScheme,
    fused: dict[str, tuple[str, ...]],
) -> dict[str, torch.Tensor]:
    """NVFP4's per-tensor global scales, one shared by each group of fused siblings; empty
    for other schemes."""
    gscales: dict[str, torch.Tensor] = {}
    if scheme.weights.strategy != QuantizationStrategy.TENSOR_GROUP:
        return gscales
    for name in weights:
        group = fused.get(name, (name,))
        if name not in gscales:
            shared = global_scale([weights[m] for m in group if m in weights])
            gscales.update({m: shared for m in group})
    return gscales


def pack_states(
    states: dict[str, dict[str, torch.Tensor]],
    scheme: QuantizationScheme,
    layout: Layout = "padded",
) -> dict[str, dict[str, torch.Tensor]]:
    """Each module's state in its stored form (`weight_packed`, ...), on the CPU, by
    compressed-tensors' compressor for the scheme's format (or our equal fast path)."""
    args = scheme.weights
    fmt = scheme_format(scheme)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    out = {}
    for name, state in states.items():
        packed = fast_compress(state, scheme, fmt, layout)
        if packed is None:
            if (
                fmt == "pack-quantized"
                and layout != installed_layout()
                and layouts_differ(args.num_bits)
            ):
                raise LlmpressError(
                    f"{args.num_bits}-bit weights in the {layout} layout need the plain "
                    "int path; drop --packing or change compressed-tensors"
                )
            packed = compressor.compress(state, scheme)
        out[name] = {k: v.detach().to("cpu").contiguous() for k, v in packed.items()}
    return out


def compress_layer(
    weights: dict[str, torch.Tensor],
    scheme: QuantizationScheme,
    fused: dict[str, tuple[str, ...]],
    observer: str = "minmax",
    device: str = "cpu",
    layout: Layout = "padded",
) -> dict[str, dict[str, torch.Tensor]]:
    """Compress the weights of several modules of one layer by round-to-nearest; keys are
    module names, tensors named locally (`weight_packed`, ...)."""
    return pack_states(layer_states(weights, scheme, fused, observer, device), scheme, layout)
