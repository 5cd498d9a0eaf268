"""The common cases of compressed-tensors' compressors, in fewer passes over the weight.

compressed-tensors quantizes in six to eight full-tensor passes (divide, clamp, round, cast to
the quantized type, back to bf16, cast again). For int and fp8 weights with channel, group or
tensor scales, the same arithmetic in the same dtypes and order takes three: divide, clamp
and round in place, cast. Packing is compressed-tensors' own `pack_to_int32`. The result is
byte-identical to the compressor's (tests/test_schemes_roundtrip.py checks every scheme); any
other case returns None and the caller uses the compressor itself.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import (
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_range

_STRATEGIES = (
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.GROUP,
    QuantizationStrategy.TENSOR,
)
_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")


def fast_compress(
    state: dict[str, torch.Tensor], scheme: QuantizationScheme, fmt: str
) -> dict[str, torch.Tensor] | None:
    args = scheme.weights
    is_int = args.type == QuantizationType.INT
    is_fp8 = args.type == QuantizationType.FLOAT and args.num_bits == 8
    if (
        fmt not in _FORMATS
        or args.strategy not in _STRATEGIES
        or args.scale_dtype is not None
        or args.actorder is not None
        or not (is_int or is_fp8)
        or (fmt == "pack-quantized") != is_int
        or (not args.symmetric and not is_int)
    ):
        return None
    weight, scale = state["weight"], state["weight_scale"]
    zero_point = None if args.symmetric else state["weight_zero_point"]

    # Shapes as compressed-tensors broadcasts them: groups split the last dim.
    x = weight
    if args.strategy == QuantizationStrategy.GROUP:
        x = weight.unflatten(-1, (-1, args.group_size))
        scale = scale.unsqueeze(-1)
        zero_point = zero_point.unsqueeze(-1) if zero_point is not None else None
    q_min, q_max = calculate_range(args, weight.device)

    q = x / scale  # in the weight's dtype, as compressed-tensors divides
    if zero_point is not None:
        q += zero_point.to(x.dtype)
    q.clamp_(q_min.item(), q_max.item())
    if is_int:
        q.round_()
    q = q.reshape(weight.shape).to(torch.int8 if is_int else torch.float8_e4m3fn)

    out = {k: v for k, v in state.items() if k not in ("weight", "weight_zero_point")}
    if fmt == "pack-quantized":
        out["weight_packed"] = pack_to_int32(q, args.num_bits)
        out["weight_shape"] = torch.tensor(weight.shape)
        if zero_point is not None:
            zp = state["weight_zero_point"]
            out["weight_zero_point"] = pack_to_int32(zp, args.num_bits, packed_dim=0).contiguous()
    else:
        out["weight"] = q
        if zero_point is not None:
            out["weight_zero_point"] = state["weight_zero_point"]
    return out
