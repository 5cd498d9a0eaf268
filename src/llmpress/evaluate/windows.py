"""Fixed, reproducible token windows over held-out text.

The text is tokenized once, without special tokens, and cut into consecutive windows from
its start, so the same text, tokenizer and window length always give the same windows. Each
window begins with the tokenizer's BOS token where it has one (models are trained to see it
first); the BOS is context only, never a predicted token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError


@dataclass(frozen=True)
class Windows:
    ids: torch.Tensor  # [windows, seq_len] int64
    bos: int | None  # prepended to each window, or None
    available: int  # how many whole windows the text holds

    @property
    def predicted_tokens(self) -> int:
        """Positions scored per window: every token after the first."""
        return self.ids.shape[0] * (self.ids.shape[1] - 1)


def token_windows(tokenizer, text: str, seq_len: int, count: int | None) -> Windows:
    """The first `count` windows of `seq_len` tokens (all whole windows when None)."""
    if seq_len < 2:
        raise LlmpressError(f"--seq-len {seq_len}: a window needs at least 2 tokens")
    if count is not None and count < 1:
        raise LlmpressError(f"--windows {count}: ask for at least one window")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    body = seq_len - (bos is not None)
    available = len(ids) // body
    if available == 0:
        raise LlmpressError(
            f"the text is {len(ids)} tokens long, shorter than one window of {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    count = available if count is None else count
    if count > available:
        raise LlmpressError(
            f"the text holds {available} windows of {seq_len} tokens, not {count}; "
            "ask for fewer --windows, a smaller --seq-len or give more text"
        )
    rows = torch.tensor(ids[: count * body], dtype=torch.int64).view(count, body)
    if bos is not None:
        rows = torch.cat([torch.full((count, 1), bos, dtype=torch.int64), rows], dim=1)
    return Windows(rows, bos, available)
