"""Perplexity, and KL divergence and top-1 agreement against the base, window by window.

Every window is scored at each position after its first: the log-probability the model gives
the true next token (perplexity), and how its whole next-token distribution differs from the
base model's at the same position (KL(base || model), whether both rank the same token
first). Sums run in float64 over all windows; each window's vocabulary-sized tensors are
processed a slice of positions at a time, so memory stays bounded for large vocabularies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from llmpress.errors import LlmpressError
from llmpress.evaluate.windows import Windows

POSITIONS_PER_SLICE = 128


@dataclass(frozen=True)
class Quality:
    tokens: int  # positions scored
    nll: float  # mean negative log-likelihood, nats per token
    base_nll: float | None
    kl_divergence: float | None  # mean KL(base || model), nats per token
    top1_agreement: float | None  # fraction of positions where both models' argmax agree
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def base_perplexity(self) -> float | None:
        return None if self.base_nll is None else math.exp(self.base_nll)


@dataclass
class _Sums:
    nll: float = 0.0
    base_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0


def _next_token_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits predicting positions 1..n-1 of each row: [rows, n - 1, vocab]."""
    return model(ids).logits[:, :-1]


def _score_slice(sums: _Sums, logits, targets, base_logits) -> None:
    logp = torch.log_softmax(logits.float(), dim=-1)
    sums.nll += float(-logp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64))
    sums.tokens += targets.numel()
    if base_logits is None:
        return
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    sums.base_nll += float(-base_logp.gather(-1, targets.unsqueeze(-1)).sum(dtype=torch.float64))
    kl = torch.nn.functional.kl_div(logp, base_logp, log_target=True, reduction="none")
    sums.kl += float(kl.sum(dtype=torch.float64))
    sums.agree += int((logp.argmax(-1) == base_logp.argmax(-1)).sum())


class Reference:
    """The base model's next-token logits for window i, computed when asked."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def logits(self, index: int, ids: torch.Tensor, known: torch.Tensor | None = None):
        """`known`: the logits already computed, when the model scored is the base itself."""
        return _next_token_logits(self.model, ids) if known is None else known


class CachedReference(Reference):
    """The base's logits saved once per window and read back for every checkpoint compared
    against it, in the dtype the base produced them (so reading back changes nothing)."""

    def __init__(self, model: torch.nn.Module, folder: Path):
        super().__init__(model)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def logits(self, index: int, ids: torch.Tensor, known: torch.Tensor | None = None):
        file = self.folder / f"window-{index:05d}.safetensors"
        if file.exists():
            return load_file(file, device=str(ids.device))["logits"]
        logits = super().logits(index, ids, known)
        save_file({"logits": logits.contiguous()}, file)
        return logits


@torch.inference_mode()
def score(
    model: torch.nn.Module,
    windows: Windows,
    reference: Reference | None = None,
    device: str = "cpu",
    progress: bool = True,
    label: str = "eval",
) -> Quality:
    """Score `model` on every window, and compare it with `reference` where given."""
    start = time.perf_counter()
    sums = _Sums()
    bar = tqdm(total=windows.ids.shape[0], desc=label, unit="window", disable=not progress)
    for index, row in enumerate(windows.ids.split(1)):
        ids = row.to(device)
        logits = _next_token_logits(model, ids)
        base_logits = None
        if reference is not None:
            known = logits if reference.model is model else None
            base_logits = reference.logits(index, ids, known)
        if base_logits is not None and base_logits.shape[-1] != logits.shape[-1]:
            raise LlmpressError(
                f"the base model predicts over {base_logits.shape[-1]} tokens and the checkpoint "
                f"over {logits.shape[-1]}: they do not share a vocabulary, so their next-token "
                "distributions cannot be compared"
            )
        targets = ids[:, 1:]
        for begin in range(0, targets.shape[1], POSITIONS_PER_SLICE):
            cut = slice(begin, begin + POSITIONS_PER_SLICE)
            _score_slice(
                sums,
                logits[:, cut],
                targets[:, cut],
                None if base_logits is None else base_logits[:, cut],
            )
        bar.update(1)
    bar.close()
    compared = reference is not None
    return Quality(
        tokens=sums.tokens,
        nll=sums.nll / sums.tokens,
        base_nll=sums.base_nll / sums.tokens if compared else None,
        kl_divergence=sums.kl / sums.tokens if compared else None,
        top1_agreement=sums.agree / sums.tokens if compared else None,
        seconds=time.perf_counter() - start,
    )
