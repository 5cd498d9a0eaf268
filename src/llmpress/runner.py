"""Calibration samples through a decoder stack, one layer resident at a time.

The model is built on the meta device; only the modules outside the decoder layers
(embeddings, rotary tables, final norm) and one decoder layer at a time hold real weights.
Every decoder layer (or encoder layer, as in BERT) is first replaced by a catcher that records
the arguments the model passes it (attention masks, position embeddings, per layer type where
layers differ, as in Gemma3; positional ones by name) and returns its input unchanged, so one
cheap forward per sample yields every layer's call arguments without tracing. Then each layer
is materialized from the checkpoint, run on each sample's hidden states (hooks on its modules
see their inputs), handed to the caller to compress, run again to give the next layer its
inputs, and freed.

Samples of equal length run together in batches of about `BATCH_TOKENS` tokens (never
padded, so padding cannot pollute statistics); the hidden states between layers live in an
`ActivationCache`, which bounds their memory and keeps them on disk for resumed runs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmpress.activations import ActivationCache
from llmpress.errors import LlmpressError
from llmpress.memory import release_large_blocks_to_os, return_freed_memory
from llmpress.sequential import Sequencer
from llmpress.source import ModelSource, build_model

# Tokens per calibration batch: large enough that matrix products dominate Python overhead,
# small enough that a layer's temporaries (MLP activations, attention scores) stay modest.
BATCH_TOKENS = 4096


class _Stop(Exception):
    """Raised by the last catcher: nothing after the decoder layers needs to run."""


class StopLayer(Exception):
    """Raised by a hook in an observing pass once it has seen all it needs: the rest of the
    layer's forward (its last matrix products, often a quarter of its work) is skipped."""


def _by_name(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A layer's call arguments after hidden_states, all by name, so that they can be replayed
    as keywords: BERT's encoder passes the attention mask (and encoder states) positionally."""
    if not args:
        return kwargs
    bound = signature.bind(None, *args, **kwargs)  # None: hidden_states, bound and dropped
    named: dict[str, Any] = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            raise LlmpressError(f"layers called with extra positional arguments (*{name})")
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif i > 0:
            named[name] = value
    return named


class _Catcher(nn.Module):
    def __init__(
        self,
        index: int,
        calls: dict[int, dict[str, Any]],
        last: bool,
        signature: inspect.Signature,
    ):
        super().__init__()
        self.index, self.calls, self.last, self.signature = index, calls, last, signature

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = _by_name(self.signature, args, kwargs)
        if self.index == 0:
            self.calls["hidden_states"] = hidden_states
        if self.last:
            raise _Stop
        return hidden_states


class _Shared:
    """Call arguments equal across batches (rotary tables and masks of one length and batch
    size) are kept once: for long calibration runs they would otherwise rival the hidden
    states in size."""

    def __init__(self):
        self._seen: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            same = self._seen.setdefault((value.shape, value.dtype, value.device), [])
            for known in same:
                if known is value or torch.equal(known, value):
                    return known
            same.append(value)
            return value
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value


@dataclass
class Batch:
    """Samples of one length run together: which ones, and each layer's call arguments."""

    samples: list[int]
    calls: dict[int, dict[str, Any]] = field(repr=False)


def batches_of(lengths: list[int], max_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Sample indices grouped by length, in order of first appearance, at most `max_tokens`
    tokens (or one sample) per batch."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    out = []
    for n, indices in by_length.items():
        size = max(1, max_tokens // n)
        out.extend(indices[i : i + size] for i in range(0, len(indices), size))
    return out


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device but buffers (rotary tables, embedding
    scales: computed in __init__, absent from checkpoints) real, on the CPU."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set_parameters(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Give `module`'s own parameters (not its children's) the checkpoint's tensors."""
    for name, param in list(module._parameters.items()):
        if param is None:  # e.g. a Linear without bias
            continue
        key = f"{prefix}{name}"
        if key not in tensors:
            raise LlmpressError(f"the checkpoint has no tensor {key}")
        module._parameters[name] = nn.Parameter(tensors[key], requires_grad=False)


class LayerRunner:
    """Holds the model skeleton and the samples' states as the layers go by."""

    def __init__(
        self,
        source: ModelSource,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        cache: ActivationCache | None = None,
    ):
        """`dtype`: compute in it (None: the checkpoint's own); `cache`: where hidden states
        live between layers (default: all in memory)."""
        if source.layer_prefix is None:
            raise LlmpressError(f"{source.path}: no decoder layers found to run layer by layer")
        release_large_blocks_to_os()  # freed batches and layers go back to the OS
        self.source, self.device, self.dtype = source, device, dtype
        self.cache = cache if cache is not None else ActivationCache()
        self.batches: list[Batch] = []
        with parameters_on_meta():
            self.model = build_model(source.config, source.tensor_entries).eval()
        self.modules = dict(self.model.named_modules())
        self.layers: nn.ModuleList = self.modules[source.layer_prefix]
        self._materialize_outside_layers()
        for module in self.model.modules():  # buffers are real everywhere; move them
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)

    def _materialize_outside_layers(self) -> None:
        """Embeddings, norms: every module outside the decoder layers, except the output head
        (the forward stops before it)."""
        layers = self.source.layer_prefix
        head = {n for n, m in self.modules.items() if m is self.model.get_output_embeddings()}
        wanted = {
            name: module
            for name, module in self.modules.items()
            if any(p is not None for p in module._parameters.values())
            and name not in head
            and not (name == layers or name.startswith(layers + "."))
        }
        keys = [
            f"{n}.{p}" if n else p
            for n, m in wanted.items()
            for p, value in m._parameters.items()
            if value is not None
        ]
        tensors = self.source.read([k for k in keys if k in self.source.tensor_entries])
        tensors = {k: self.placed(v) for k, v in tensors.items()}
        for name, module in wanted.items():
            _set_parameters(module, tensors, f"{name}." if name else "")

    def placed(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(self.device)
        return tensor.to(self.dtype) if self.dtype and tensor.is_floating_point() else tensor

    @torch.inference_mode()
    def capture(
        self,
        samples: list[torch.Tensor],
        attention_masks: list[torch.Tensor] | None = None,
        hidden: bool = True,
    ) -> list[Batch]:
        """Batch the samples; record the arguments every layer is called with, and (with
        `hidden`) each batch's input to layer 0 as the cache's first generation. A resumed run
        passes hidden=False: its cache already holds a later generation.

        `attention_masks`: one 0/1 mask per sample (1: a real token), for padded samples; the
        model turns it into each layer's attention mask as it would in a batch."""
        real = list(self.layers)
        signatures = [inspect.signature(layer.forward) for layer in real]
        shared = _Shared()
        self.batches = []
        try:
            for i, members in enumerate(batches_of([len(s) for s in samples])):
                calls: dict[Any, Any] = {}
                for j in range(len(real)):
                    self.layers[j] = _Catcher(j, calls, j == len(real) - 1, signatures[j])
                ids = torch.stack([samples[k] for k in members]).to(self.device)
                inputs: dict[str, Any] = {"use_cache": False}
                if attention_masks is not None:
                    mask = torch.stack([attention_masks[k] for k in members])
                    inputs["attention_mask"] = mask.to(self.device)
                with contextlib.suppress(_Stop):
                    self.model(ids, **inputs)
                states = calls.pop("hidden_states")
                if hidden:
                    self.cache.put(i, states)
                self.batches.append(Batch(members, shared(calls)))
        finally:
            for j, layer in enumerate(real):
                self.layers[j] = layer
        if hidden:
            self.cache.advance()
        return self.batches

    def load_layer(self, index: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Layer `index` with its checkpoint weights, on the compute device; `tensors`: the
        layer's tensors by full name, when the caller has read them already."""
        layer = self.layers[index]
        prefix = f"{self.source.layer_prefix}.{index}."
        if tensors is None:
            names = [n for n in self.source.tensor_entries if n.startswith(prefix)]
            tensors = self.source.read(names)
        tensors = {k: self.placed(v) for k, v in tensors.items()}
        for name, module in layer.named_modules():
            _set_parameters(module, tensors, f"{prefix}{name}." if name else prefix)
        return layer

    def unload_layer(self, index: int) -> None:
        self.layers[index].to("meta")
        return_freed_memory()  # what the layer's batches freed goes back to the OS

    @torch.inference_mode()
    def forward_layer(self, index: int, update: bool = True) -> None:
        """Run layer `index` on every batch; `update`: its outputs become the next
        generation of hidden states (False: a pass for hooks to observe)."""
        layer = self.layers[index]
        for i, batch in enumerate(self.batches):
            try:
                out = layer(self.cache.get(i).to(self.device), **batch.calls[index])
            except StopLayer:
                if update:
                    raise
                continue
            if update:
                self.cache.put(i, out[0] if isinstance(out, tuple) else out)
        if update:
            self.cache.advance()

    @torch.inference_mode()
    def forward_layer_sequential(
        self, index: int, sequencer: Sequencer, compress: Callable[[str], list[str]]
    ) -> None:
        """Run layer `index` on every batch in one pass, each of `sequencer`'s modules
        compressed by `compress(name)` once every batch has reached it; its outputs become
        the next generation of hidden states (llmpress.sequential)."""
        layer = self.layers[index]

        def forward(i: int) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                out = layer(self.cache.get(i).to(self.device), **self.batches[i].calls[index])
                return out[0] if isinstance(out, tuple) else out

            return run

        sequencer.run([forward(i) for i in range(len(self.batches))], compress, self.cache.put)
        self.cache.advance()

    @torch.inference_mode()
    def forward_batch(self, index: int, batch: int = 0) -> torch.Tensor:
        """Layer `index`'s output on one batch, without keeping it (probes, checks)."""
        out = self.layers[index](
            self.cache.get(batch).to(self.device), **self.batches[batch].calls[index]
        )
        return out[0] if isinstance(out, tuple) else out

    def hidden_states(self) -> list[torch.Tensor]:
        """The current hidden states, one [1, length, hidden] tensor per sample, in order."""
        out: dict[int, torch.Tensor] = {}
        for i, batch in enumerate(self.batches):
            states = self.cache.get(i)
            out.update((k, states[j : j + 1]) for j, k in enumerate(batch.samples))
        return [out[k] for k in sorted(out)]
