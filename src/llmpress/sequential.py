"""One pass per layer in which each module calibrates on the outputs of the modules before it,
compressed: GPTQ's "true sequential" order, without running the layer again for each module or
a second time to propagate.

Every batch's forward through the layer runs as a greenlet (all on this thread, so torch's
thread-local modes and its thread pool are shared). A pre-hook pauses a batch at its first call
of a module not compressed yet. Once every batch waits at that module, all of the module's
inputs have been observed (by hooks registered before the pause): the caller compresses it, and
the batches go on through it, compressed, to the next one. The outputs of the last module's
batches are the layer's compressed outputs: the next layer's inputs.

The price: the paused batches hold their activations (about three hidden states' worth each,
with the MLP's intermediate ones) until the layer is done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from greenlet import greenlet
from torch import nn

from llmpress.errors import LlmpressError


class Sequencer:
    """Pre-hooks that pause each batch's forward at the modules still to be compressed."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.compressed: set[str] = set()

    def hook(self, name: str):
        def pause(module, args):
            if name in self.compressed:
                return None
            # Back to `run`, which resumes this batch once `name` is compressed.
            greenlet.getcurrent().parent.switch(name)
            # Hooks registered meanwhile (the compressed module's input quantizer) act on this
            # call too: the call has already taken its snapshot of the hooks.
            later = list(module._forward_pre_hooks.items())
            mine = self._ids[name]
            for key, hook in later:
                if key > mine:
                    result = hook(module, args)
                    if result is not None:
                        args = result if isinstance(result, tuple) else (result,)
            return args

        return pause

    def run(
        self,
        forwards: Iterable[Callable[[], torch.Tensor]],
        compress: Callable[[str], Iterable[str]],
        finished: Callable[[int, torch.Tensor], None],
    ) -> None:
        """Run every batch's forward (`forwards`, in order) through the layer; each time all
        the batches still running wait at one module, `compress(name)` compresses it (and
        returns the names it compressed: its fused siblings too); `finished(i, output)` takes
        batch i's output as it comes."""
        handles = {
            name: module.register_forward_pre_hook(self.hook(name))
            for name, module in self.modules.items()
        }
        self._ids = {name: handle.id for name, handle in handles.items()}
        try:
            batches = [greenlet(forward) for forward in forwards]
            running = list(range(len(batches)))
            while running:
                waiting: dict[int, str] = {}
                for i in running:
                    value = batches[i].switch()
                    if batches[i].dead:
                        finished(i, value)
                    else:
                        waiting[i] = value
                names = set(waiting.values())
                if len(names) > 1:
                    raise LlmpressError(
                        f"the batches of one layer call its modules in different orders "
                        f"({', '.join(sorted(names))}); use --propagate compressed"
                    )
                if names:
                    name = names.pop()
                    self.compressed.add(name)
                    self.compressed.update(compress(name))
                running = list(waiting)
        finally:
            for handle in handles.values():
                handle.remove()
