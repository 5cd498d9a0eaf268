"""SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): prune inside GPTQ's column solve
(llmpress.algorithms.gptq), choosing as each block of columns is reached the weights whose
removal costs least, w² / [H⁻¹]ⱼⱼ², and pushing their removal error onto the columns not yet
reached. Before a quantizing solve the weight is pruned by this solve alone, then quantized
with its zeros kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.algorithms.base import Need, Pruner
from llmpress.sparsity import Structure, lowest


@dataclass(frozen=True)
class Pruning:
    """What a solve prunes (SparseGPT): as each block of columns is reached, the weights of
    lowest w² / [H⁻¹]ⱼⱼ² (the error their removal causes) among the block's weights as updated
    so far: `sparsity` of each row slice's share (`rows`: stacked modules, each its own
    budget), or N of every M columns of each row, chosen as the solve reaches them. `fixed`:
    a mask chosen beforehand instead (Wanda's, magnitude's; True where pruned), whose
    removals the solve compensates as SparseGPT's."""

    structure: Structure
    sparsity: float
    rows: tuple[slice, ...] = ()
    fixed: torch.Tensor | None = None

    def slices(self, rows: int) -> tuple[slice, ...]:
        return self.rows or (slice(0, rows),)


def block_mask(w1: torch.Tensor, u1: torch.Tensor, prune: Pruning) -> torch.Tensor:
    """SparseGPT's unstructured mask of one block of columns (transposed: [columns, rows]):
    in each row slice, the `sparsity` share of lowest w² / [H⁻¹]ⱼⱼ²."""
    scores = w1**2 / u1.diagonal().reshape(-1, 1) ** 2
    mask = torch.zeros_like(w1, dtype=torch.bool)
    for rows in prune.slices(w1.shape[1]):
        part = scores[:, rows]
        mask[:, rows] = lowest(part, int(part.numel() * prune.sparsity))
    return mask


@dataclass(frozen=True, kw_only=True)
class _SparseGPT(Pruner):
    def recipe_args(self, options, args: dict | None = None) -> dict:
        return dict(args or {}) | {
            "block_size": options.block_size,
            "dampening_frac": options.dampening_frac,
        }

    def prune(self, ctx, weights, masks):  # noqa: ANN001, ANN201
        """Pruned by the column solve alone (before round-to-nearest, or stored dense)."""
        from llmpress.algorithms.solve import solve_modules  # it imports this module

        return solve_modules(ctx, weights, None, masks, ctx.config(self), self.manifest)


SPARSEGPT = _SparseGPT(
    name="sparsegpt",
    modifier="SparseGPTModifier",
    needs=Need.HESSIAN,
    summary="prune by the inputs' Hessian, compensating each removal (needs --dataset)",
    needs_data="SparseGPT prunes by the Hessians of the layers' inputs",
    propagation="sequential",
    manifest="sparsegpt",
    options=(
        "sparsity",
        "mask",
        "sparsity_targets",
        "sparsity_ignore",
        "block_size",
        "dampening_frac",
    ),
    solved=True,
)
