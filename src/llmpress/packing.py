"""Sub-byte integer packing in both layouts compressed-tensors has used.

Up to 0.17 each int32 word holds `32 // bits` values and the rest of the word is padding;
from 0.18 on values run across words densely (`ceil(n * bits / 32)` words for n values), which
is also what vLLM 0.32's kernels load. The two agree for 1, 2, 4 and 8 bits. The installed
compressed-tensors packs in its own layout; this module supplies the other one, so a
checkpoint can be written for the reader that will load it. Both are checked byte for byte
against the compressed-tensors release that defines them (tests/test_readers.py).
"""

from __future__ import annotations

import math
import re
import sys
from typing import Literal

import compressed_tensors
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

Layout = Literal["padded", "dense"]


def layout_of(ct_version: str) -> Layout:
    """The layout a compressed-tensors release packs and reads."""
    major, minor = re.match(r"(\d+)\.(\d+)", ct_version).groups()
    return "dense" if (int(major), int(minor)) >= (0, 18) else "padded"


def installed_layout() -> Layout:
    return layout_of(compressed_tensors.__version__)


def layouts_differ(num_bits: int) -> bool:
    return 32 % num_bits != 0


def byte_packable(num_bits: int, cols: int = 0) -> bool:
    """Whether rows of `cols` values pack byte-wise with no padding (see `_pack_bytes`)."""
    return num_bits in (2, 4, 8) and sys.byteorder == "little" and cols % (32 // num_bits) == 0


def pack(values: torch.Tensor, num_bits: int, layout: Layout, packed_dim: int = 1) -> torch.Tensor:
    """int8 values -> int32 words in `layout` (compressed-tensors' own packer where it applies)."""
    if packed_dim == 1 and byte_packable(num_bits):
        return _pack_bytes(values, num_bits)
    if layout == installed_layout() or not layouts_differ(num_bits):
        return pack_to_int32(values, num_bits, packed_dim=packed_dim)
    if packed_dim == 0:
        return pack(values.t(), num_bits, layout).t().contiguous()
    unsigned = values.to(torch.int64) + (1 << (num_bits - 1))
    if layout == "padded":
        return _pack_padded(unsigned, num_bits)
    return _pack_dense(unsigned, num_bits)


def _pack_bytes(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """2, 4 and 8 bits fill whole bytes, and on a little-endian host the bytes of an int32
    word are its values in order, so packing is combining values into bytes (both layouts
    agree at these widths)."""
    cols = values.shape[1]
    unsigned = (values + (1 << (num_bits - 1))).view(torch.uint8)
    pad = -cols % (32 // num_bits)
    if pad:
        unsigned = torch.nn.functional.pad(unsigned, (0, pad))
    out = torch.empty(values.shape[0], unsigned.shape[1] * num_bits // 8, dtype=torch.uint8)
    return pack_unsigned_bytes(unsigned, num_bits, out).view(torch.int32)


_WIDE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def pack_unsigned_bytes(unsigned: torch.Tensor, num_bits: int, out: torch.Tensor) -> torch.Tensor:
    """Offset (unsigned) 2/4/8-bit values, one per byte, into `out` (uint8, cols * bits / 8).

    The values of one output byte are read as one wider little-endian integer, in which value i
    sits at bit 8 * i; shifting it right by i * (8 - bits) and OR-ing puts value i at bit
    i * bits, and the low byte is the packed byte. Contiguous passes over the wide integers
    instead of strided byte slices.
    """
    per_byte = 8 // num_bits
    if per_byte == 1:
        return out.copy_(unsigned)
    wide = unsigned.view(_WIDE[per_byte])
    acc = wide.clone()
    shifted = torch.empty_like(wide)
    for i in range(1, per_byte):
        torch.bitwise_right_shift(wide, i * (8 - num_bits), out=shifted)
        acc.bitwise_or_(shifted)
    return out.copy_(acc)  # the cast keeps the low byte of each wide integer


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_padded(unsigned: torch.Tensor, num_bits: int) -> torch.Tensor:
    rows, cols = unsigned.shape
    per_word = 32 // num_bits
    unsigned = torch.nn.functional.pad(unsigned, (0, math.ceil(cols / per_word) * per_word - cols))
    shifts = torch.arange(per_word, dtype=torch.int64) * num_bits
    words = (unsigned.view(rows, -1, per_word) << shifts).sum(-1)
    return _as_int32(words)


def _pack_dense(unsigned: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Value i occupies bits [i * bits, (i + 1) * bits) of one little-endian bit stream."""
    rows, cols = unsigned.shape
    unsigned = torch.nn.functional.pad(unsigned, (0, math.ceil(cols / 32) * 32 - cols))
    groups = unsigned.view(rows, -1, 32)  # 32 values fill exactly `bits` words
    words = torch.zeros(rows, groups.shape[1], num_bits, dtype=torch.int64)
    for i in range(32):
        start = i * num_bits
        word, offset = divmod(start, 32)
        words[..., word] |= (groups[..., i] << offset) & 0xFFFFFFFF
        if offset + num_bits > 32:  # the value straddles two words
            words[..., word + 1] |= groups[..., i] >> (32 - offset)
    return _as_int32(words.view(rows, -1)[:, : math.ceil(cols * num_bits / 32)])
