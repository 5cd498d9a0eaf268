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


def pack(values: torch.Tensor, num_bits: int, layout: Layout, packed_dim: int = 1) -> torch.Tensor:
    """int8 values -> int32 words in `layout` (compressed-tensors' own packer where it applies)."""
    if num_bits in (2, 4, 8) and packed_dim == 1 and sys.byteorder == "little":
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
    word are its values in order: combine values into bytes and reinterpret, two uint8 passes
    instead of an int32 shift-and-sum over every value (both layouts agree at these widths)."""
    rows, cols = values.shape
    per_byte = 8 // num_bits
    unsigned = (values + (1 << (num_bits - 1))).view(torch.uint8)
    unsigned = torch.nn.functional.pad(unsigned, (0, -cols % (4 * per_byte)))
    packed = unsigned[:, 0::per_byte].clone()
    for i in range(1, per_byte):
        packed |= unsigned[:, i::per_byte] << (i * num_bits)
    return packed.view(torch.int32)


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
