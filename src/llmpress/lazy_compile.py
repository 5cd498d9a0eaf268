"""Import compressed-tensors without loading torch's compiler stack up front.

compressed-tensors decorates one function (an FP4 cast) with `@torch.compile` at import time,
and calling `torch.compile` imports torch._dynamo and torch._inductor: about 2 s on a small
machine, paid by every `llmpress` run though almost none calls that function. During the
imports the CLI makes, `torch.compile` is replaced by a decorator that calls the real one on
first use, so the compiled function behaves as before and costs nothing until it runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any


def _deferred(real: Callable[..., Any]) -> Callable[..., Any]:
    def compile_later(fn: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        if fn is None:  # used as @torch.compile(...)
            return lambda f: compile_later(f, **kwargs)
        compiled = None

        @functools.wraps(fn)
        def call(*args: Any, **kw: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(fn, **kwargs)
            return compiled(*args, **kw)

        return call

    return compile_later


@contextlib.contextmanager
def deferred_torch_compile() -> Iterator[None]:
    import torch

    real = torch.compile
    torch.compile = _deferred(real)
    try:
        yield
    finally:
        torch.compile = real
