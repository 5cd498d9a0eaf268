"""Wanda (Sun et al., 2023, arXiv:2306.11695): prune the weights of lowest |W_ij| * ||x_j||, the
norm of input channel j over the calibration tokens, compared within each output row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.algorithms.base import Need, Pruner
from llmpress.sparsity import Structure, lowest_n_of_m, lowest_per_row


def wanda_mask(
    weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float, structure: Structure
) -> torch.Tensor:
    """Wanda's mask: the lowest |W_ij| * ||x_j||, `sparsity` of each output row (the paper's
    per-output comparison group), or N of every M."""
    scores = weight.abs().float() * input_norms.to(weight.device, torch.float32).reshape(1, -1)
    if structure.structured:
        return lowest_n_of_m(scores, structure.n, structure.m)
    return lowest_per_row(scores, int(weight.shape[1] * sparsity))


@dataclass(frozen=True, kw_only=True)
class _Wanda(Pruner):
    def mask(self, weight, input_norms, sparsity, structure):  # noqa: ANN001, ANN201
        return wanda_mask(weight, input_norms, sparsity, structure)


WANDA = _Wanda(
    name="wanda",
    modifier="WandaPruningModifier",
    needs=Need.INPUT_NORMS,
    summary="prune by |W| times the norm of each weight's input channel (needs --dataset)",
    needs_data="Wanda prunes by the norms of the layers' inputs",
    propagation="sequential",
    options=("sparsity", "mask", "sparsity_targets", "sparsity_ignore"),
)
