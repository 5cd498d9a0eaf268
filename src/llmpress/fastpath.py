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
from compressed_tensors.quantization import (
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_range

from llmpress.packing import Layout, pack

_STRATEGIES = (
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.GROUP,
    QuantizationStrategy.TENSOR,
)
_BLOCK_ELEMENTS = 1 << 22
_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")


def fast_compress(
    state: dict[str, torch.Tensor], scheme: QuantizationScheme, fmt: str, layout: Layout
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

    q_min, q_max = calculate_range(args, weight.device)
    # Rows are independent (scales are per row, group or tensor, and packing runs along rows),
    # so work in row blocks: temporaries stay a few MB instead of several times the weight.
    rows_per_block = max(1, _BLOCK_ELEMENTS // weight.shape[1])
    q = None  # allocated from the first block's result: packed width is known only then
    for start in range(0, weight.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        x, s, z = weight[rows], scale, zero_point
        if scale.numel() > 1:
            s = scale[rows]
            z = zero_point[rows] if zero_point is not None else None
        if args.strategy == QuantizationStrategy.GROUP:  # groups split the last dim
            x = x.unflatten(-1, (-1, args.group_size))
            s = s.unsqueeze(-1)
            z = z.unsqueeze(-1) if z is not None else None
        block = x / s  # in the weight's dtype, as compressed-tensors divides
        if z is not None:
            block += z.to(x.dtype)
        block.clamp_(q_min.item(), q_max.item())
        if is_int:
            block.round_()
        block = block.reshape(-1, weight.shape[1]).to(torch.int8 if is_int else torch.float8_e4m3fn)
        if fmt == "pack-quantized":
            block = pack(block, args.num_bits, layout)
        if q is None:
            q = torch.empty((weight.shape[0], block.shape[1]), dtype=block.dtype)
        q[rows] = block

    out = {k: v for k, v in state.items() if k not in ("weight", "weight_zero_point")}
    if fmt == "pack-quantized":
        out["weight_packed"] = q
        out["weight_shape"] = torch.tensor(weight.shape)
        if zero_point is not None:
            zp = state["weight_zero_point"]
            out["weight_zero_point"] = pack(zp, args.num_bits, layout, packed_dim=0).contiguous()
    else:
        out["weight"] = q
        if zero_point is not None:
            out["weight_zero_point"] = state["weight_zero_point"]
    return out
