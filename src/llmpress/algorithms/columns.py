"""Quantize-dequantize by columns and by whole weights, as the solves need it: GPTQ and
SparseGPT round one column at a time with per-row parameters (`column_quantizer`), and GPTQ's
and AWQ's losses compare against round to nearest (`rtn_dequantized`) by the output error
through the inputs' Hessian (`output_error`).
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_range

from llmpress.observers import weight_qparams


def column_args(args: QuantizationArgs) -> QuantizationArgs:
    """The same quantization, applied to one column with one scale per row."""
    return args.model_copy(
        update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None, "actorder": None}
    )


def stored_scale(scale: torch.Tensor, args: QuantizationArgs, dtype: torch.dtype) -> torch.Tensor:
    # As the RTN path stores them: in the weight's dtype unless the scheme fixes one.
    return scale.to(dtype) if args.scale_dtype is None else scale


def column_params(scale, zero_point, args, rows: int):
    """Per-column (rows, 1) views of tensor, channel or block parameters: a function of the
    column index."""
    strategy = args.strategy
    if strategy in (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL):
        s = scale.reshape(-1, 1).expand(rows, 1)
        z = zero_point.reshape(-1, 1).expand(rows, 1) if zero_point is not None else None
        return lambda column: (s, z)
    if strategy == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        s_rows = scale.repeat_interleave(bh, dim=0)[:rows]
        z_rows = zero_point.repeat_interleave(bh, dim=0)[:rows] if zero_point is not None else None
        return lambda column: (
            s_rows[:, column // bw : column // bw + 1],
            z_rows[:, column // bw : column // bw + 1] if z_rows is not None else None,
        )
    raise AssertionError(strategy)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """mean over tokens of |ΔW x|², from H = mean(x xᵀ): sum((ΔW H) ∘ ΔW)."""
    return float(((delta @ hessian) * delta).sum())


def column_quantizer(args: QuantizationArgs, global_scale: torch.Tensor | None):
    """Quantize-dequantize of one column [rows] with per-row scale and zero point [rows], and
    how to flatten a column's parameters for it. Int and fp8 weights take a direct path with
    compressed-tensors' arithmetic in float32 (divide, add the zero point, clamp, round or
    cast; bf16 scales are exact in float32); other types go through its fake_quantize, with
    the parameters in their own dtype."""
    if global_scale is None and (
        args.type == "int" or (args.type == "float" and args.num_bits == 8)
    ):
        q_min, q_max = (float(v) for v in calculate_range(args, "cpu"))
        fp8 = args.type == "float"

        def direct(x, scale, zero_point):
            scaled = x / scale
            if zero_point is not None:
                scaled += zero_point
            scaled.clamp_(q_min, q_max)
            q = scaled.to(torch.float8_e4m3fn).to(torch.float32) if fp8 else scaled.round_()
            if zero_point is not None:
                q -= zero_point
            return q.mul_(scale)

        return direct, _flat32
    per_column = column_args(args)

    def generic(x, scale, zero_point):
        z = zero_point.reshape(-1, 1) if zero_point is not None else None
        q = fake_quantize(
            x.reshape(-1, 1), scale.reshape(-1, 1), z, per_column, global_scale=global_scale
        )
        return q.reshape(-1).to(torch.float32)

    return generic, _flat


def _flat(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.reshape(-1)


def _flat32(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.reshape(-1).to(torch.float32)


def group_args(args: QuantizationArgs, g: int) -> QuantizationArgs:
    """Parameters of one group [rows, g]: the scheme's own arithmetic, one group per row."""
    return args.model_copy(update={"group_size": g, "actorder": None})


def rtn_dequantized(weight, args, observer, global_scale, scale_dtype) -> torch.Tensor:
    """Round-to-nearest, quantized and dequantized in float32: the baseline GPTQ reports
    against, and what AWQ searches over."""
    scale, zero_point = weight_qparams(weight, args, observer, global_scale)
    scale = stored_scale(scale, args, scale_dtype)
    no_order = args.model_copy(update={"actorder": None})
    return fake_quantize(weight, scale, zero_point, no_order, global_scale=global_scale).to(
        torch.float32
    )
