"""Magnitude pruning: the weights of smallest |W| become zero, `sparsity` of the whole tensor or
N of every M along each row. It needs no data: a data-free run prunes as it streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.algorithms.base import Need, Pruner
from llmpress.sparsity import Structure, lowest, lowest_n_of_m


def magnitude_mask(weight: torch.Tensor, sparsity: float, structure: Structure) -> torch.Tensor:
    """The smallest weights by |W|: `sparsity` of the whole tensor, or N of every M."""
    scores = weight.abs().float()
    if structure.structured:
        return lowest_n_of_m(scores, structure.n, structure.m)
    return lowest(scores, int(weight.numel() * sparsity))


@dataclass(frozen=True, kw_only=True)
class _Magnitude(Pruner):
    def recipe_args(self, options, args: dict | None = None) -> dict:
        """llm-compressor's magnitude modifier ramps from init_sparsity to final_sparsity:
        here both are the target."""
        out = dict(args or {})
        out["final_sparsity"] = out.pop("sparsity")
        out["init_sparsity"] = out["final_sparsity"]
        return out

    def mask(self, weight, input_norms, sparsity, structure):  # noqa: ANN001, ANN201
        return magnitude_mask(weight, sparsity, structure)


MAGNITUDE = _Magnitude(
    name="magnitude",
    modifier="MagnitudePruningModifier",
    needs=Need.NOTHING,
    summary="prune the smallest weights by |W| (no data)",
    options=("sparsity", "mask", "sparsity_targets", "sparsity_ignore"),
)
