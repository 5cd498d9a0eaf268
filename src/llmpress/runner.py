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
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.source import ModelSource, build_model


class _Stop(Exception):
    """Raised by the last catcher: nothing after the decoder layers needs to run."""


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


@dataclass
class SampleState:
    """One sample between layers: its hidden states and each layer's call arguments."""

    hidden: torch.Tensor
    calls: dict[int, dict[str, Any]] = field(repr=False)


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

    def __init__(self, source: ModelSource, device: str = "cpu"):
        if source.layer_prefix is None:
            raise LlmpressError(f"{source.path}: no decoder layers found to run layer by layer")
        self.source, self.device = source, device
        with parameters_on_meta():
            self.model = build_model(source.config).eval()
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
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        for name, module in wanted.items():
            _set_parameters(module, tensors, f"{name}." if name else "")

    @torch.inference_mode()
    def capture(
        self, samples: list[torch.Tensor], attention_masks: list[torch.Tensor] | None = None
    ) -> list[SampleState]:
        """Each sample's input to layer 0 and the arguments every layer is called with.

        `attention_masks`: one 0/1 mask per sample (1: a real token), for padded samples; the
        model turns it into each layer's attention mask as it would in a batch."""
        real = list(self.layers)
        signatures = [inspect.signature(layer.forward) for layer in real]
        masks = attention_masks or [None] * len(samples)
        states = []
        try:
            for sample, mask in zip(samples, masks, strict=True):
                calls: dict[Any, Any] = {}
                for i in range(len(real)):
                    self.layers[i] = _Catcher(i, calls, i == len(real) - 1, signatures[i])
                inputs = {"use_cache": False}
                if mask is not None:
                    inputs["attention_mask"] = mask.unsqueeze(0).to(self.device)
                with contextlib.suppress(_Stop):
                    self.model(sample.unsqueeze(0).to(self.device), **inputs)
                hidden = calls.pop("hidden_states")
                states.append(SampleState(hidden, calls))
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer
        return states

    def load_layer(self, index: int, tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Layer `index` with its checkpoint weights, on the compute device; `tensors`: the
        layer's tensors by full name, when the caller has read them already."""
        layer = self.layers[index]
        prefix = f"{self.source.layer_prefix}.{index}."
        if tensors is None:
            names = [n for n in self.source.tensor_entries if n.startswith(prefix)]
            tensors = self.source.read(names)
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        for name, module in layer.named_modules():
            _set_parameters(module, tensors, f"{prefix}{name}." if name else prefix)
        return layer

    def unload_layer(self, index: int) -> None:
        self.layers[index].to("meta")

    @torch.inference_mode()
    def forward_layer(self, index: int, states: list[SampleState], update: bool = True) -> None:
        """Run layer `index` on every sample; `update`: its output becomes the hidden states
        (False: a pass for hooks to observe)."""
        layer = self.layers[index]
        for state in states:
            out = layer(state.hidden, **state.calls[index])
            if update:
                state.hidden = out[0] if isinstance(out, tuple) else out

    def run(
        self,
        samples: list[torch.Tensor],
        on_layer: Callable[[int, nn.Module, list[SampleState]], None] | None = None,
    ) -> Iterator[tuple[int, nn.Module]]:
        """Yield each materialized layer after `on_layer` (observe, compress) and before its
        output becomes the next layer's input."""
        states = self.capture(samples)
        for index in range(len(self.layers)):
            layer = self.load_layer(index)
            if on_layer is not None:
                on_layer(index, layer, states)
            yield index, layer
            self.forward_layer(index, states)
            self.unload_layer(index)
        self.states = states
