"""Sparsity structures, shared by the pruners (llmpress.algorithms: magnitude, wanda, sparsegpt):
which weights a mask may prune, the exact-count selections masks are built from, and how to
check a stored weight against its structure.

Structures follow llm-compressor's `mask_structure`: "unstructured", or "N:M": N weights of
every M consecutive ones of a row (along the input) are zero, as the sparse tensor cores of
NVIDIA GPUs want 2:4. Masks are boolean, True where a weight is pruned, and always prune an
exact count: ties never push a layer over its target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class Structure:
    """Unstructured (n = m = 0), or n zeros in every m consecutive weights of a row."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Structure:
        """ "unstructured" (or llm-compressor's "0:0"), or "N:M" with 0 < N < M."""
        text = str(text).strip().lower()
        if text in ("unstructured", "0:0"):
            return cls()
        found = re.fullmatch(r"(\d+):(\d+)", text)
        if not found or not 0 < int(found[1]) < int(found[2]):
            raise ValueError(
                f"mask {text!r}: use unstructured, or N:M with 0 < N < M (N zeros in every M "
                "consecutive weights of a row, e.g. 2:4)"
            )
        return cls(int(found[1]), int(found[2]))

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @property
    def sparsity(self) -> float:
        """The fraction an N:M structure prunes."""
        return self.n / self.m


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A mask of the `count` lowest scores of the whole tensor."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        mask[torch.topk(scores.flatten(), count, largest=False, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A mask of the `count` lowest scores of each row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.scatter_(
            1, torch.topk(scores, count, dim=1, largest=False, sorted=False).indices, True
        )
    return mask


def lowest_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A mask of the n lowest scores in every m consecutive columns of each row."""
    rows, columns = scores.shape
    blocks = scores.reshape(rows, columns // m, m)
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(2, torch.topk(blocks, n, dim=2, largest=False, sorted=False).indices, True)
    return mask.reshape(rows, columns)


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def n_m_violations(weight: torch.Tensor, structure: Structure) -> int:
    """How many blocks of M consecutive weights of a row hold fewer than N zeros."""
    if not structure.structured:
        return 0
    rows, columns = weight.shape
    if columns % structure.m:
        return rows * -(-columns // structure.m)
    zeros = (weight == 0).reshape(rows, columns // structure.m, structure.m).sum(dim=2)
    return int((zeros < structure.n).sum())


def check_columns(name: str, columns: int, structure: Structure) -> None:
    """N:M blocks tile a row: M must divide the input features."""
    if structure.structured and columns % structure.m:
        raise LlmpressError(
            f"{name} has {columns} input features, which {structure.label} blocks of "
            f"{structure.m} do not tile; --ignore it or use another mask"
        )
