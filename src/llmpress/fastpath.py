"""The common cases of compressed-tensors' compressors, in fewer passes over the weight.

compressed-tensors quantizes in six to eight full-tensor passes (divide, clamp, round, cast to
the quantized type, back to bf16, cast again). For int and fp8 weights with channel, group or
tensor scales, the same arithmetic in the same dtypes and order runs in place in reused
buffers: divide, clamp and round, cast; 2/4/8-bit values are packed byte-wise. The result is
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

from llmpress.packing import Layout, byte_packable, pack, pack_unsigned_bytes

_STRATEGIES = (
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.GROUP,
    QuantizationStrategy.TENSOR,
)
_BLOCK_ELEMENTS = 1 << 20  # 2 MB of bf16: a block's passes stay in a core's L2
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
        or "weight_g_idx" in state  # group activation order: the generic compressor
        or not (is_int or is_fp8)
        or (fmt == "pack-quantized") != is_int
        or (not args.symmetric and not is_int)
    ):
        return None
    weight, scale = state["weight"], state["weight_scale"]
    zero_point = None if args.symmetric else state["weight_zero_point"]

    q_min, q_max = (float(v) for v in calculate_range(args, weight.device))
    rows_out, cols = weight.shape
    packed = fmt == "pack-quantized"
    by_bytes = packed and byte_packable(args.num_bits, cols)
    # Rows are independent (scales are per row, group or tensor, and packing runs along rows),
    # so work in row blocks through buffers allocated once per weight: temporaries stay a few
    # MB, and each block costs no fresh allocation (page faults were a third of the time).
    rows_per_block = max(1, min(rows_out, _BLOCK_ELEMENTS // cols))
    work = torch.empty((rows_per_block, cols), dtype=weight.dtype, device=weight.device)
    ints = torch.empty((rows_per_block, cols), dtype=torch.int8, device=weight.device)
    if by_bytes:
        q = torch.empty((rows_out, cols * args.num_bits // 32), dtype=torch.int32)
    elif packed:
        q = None  # the generic packer's width is known from its first block
    else:
        q = torch.empty(weight.shape, dtype=torch.int8 if is_int else torch.float8_e4m3fn)
    for start in range(0, rows_out, rows_per_block):
        rows = slice(start, start + rows_per_block)
        x, s, z = weight[rows], scale, zero_point
        n = x.shape[0]
        if scale.numel() > 1:
            s = scale[rows]
            z = zero_point[rows] if zero_point is not None else None
        block = work[:n]
        if args.strategy == QuantizationStrategy.GROUP:  # groups split the last dim
            x = x.unflatten(-1, (-1, args.group_size))
            s = s.unsqueeze(-1)
            z = z.unsqueeze(-1) if z is not None else None
            block = block.unflatten(-1, (-1, args.group_size))
        torch.div(x, s, out=block)  # in the weight's dtype, as compressed-tensors divides
        if z is not None:
            block += z.to(x.dtype)
        block.clamp_(q_min, q_max)
        if is_int:
            block.round_()
        block = block.reshape(n, cols)
        if not packed:
            q[rows] = block  # the cast to int8 / fp8 on assignment
            continue
        values = ints[:n]
        values.copy_(block)
        if by_bytes:
            values += 1 << (args.num_bits - 1)
            pack_unsigned_bytes(values.view(torch.uint8), args.num_bits, q[rows].view(torch.uint8))
            continue
        words = pack(values, args.num_bits, layout)
        if q is None:
            q = torch.empty((rows_out, words.shape[1]), dtype=words.dtype)
        q[rows] = words

    out = {k: v for k, v in state.items() if k not in ("weight", "weight_zero_point")}
    if packed:
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
