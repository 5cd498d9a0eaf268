"""Mixture-of-experts layers with one Linear per expert projection, as checkpoints store them.

transformers 5 holds a layer's experts as two 3-D parameters (`gate_up_proj`: experts x 2I x H,
`down_proj`: experts x H x I) and converts the checkpoint's per-expert tensors
(`experts.3.gate_proj.weight`, or Mixtral's `experts.3.w1.weight`) into them when it loads.
Quantization works per Linear and writes per-expert tensors (what vLLM and compressed-tensors
read), so the model skeleton built here replaces each such experts module by `UnfusedExperts`:
a list of small MLPs whose Linears bear the checkpoint's names. The plan then sees every
expert projection as a Linear, the layer runner loads them by name, and hooks observe each
expert's inputs.

During calibration every expert runs on every token of the batch, so that each one, however
rarely routed, gets statistics over the whole calibration set (and the same input tensor: the
experts of a layer share one Hessian and one smoothing). Only the routed tokens' outputs are
kept, weighted as the router says, so the layer's output is the model's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Per-expert projection names in checkpoints: (gate, up, down).
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its Linears named as in the checkpoint."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inner: int, act: nn.Module):
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, inner, bias=False))
        self.add_module(up, nn.Linear(hidden, inner, bias=False))
        self.add_module(down, nn.Linear(inner, hidden, bias=False))
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's replacement, called as it is: (hidden states [tokens, H],
    each token's chosen experts [tokens, k], their weights [tokens, k])."""

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            routed = expert(hidden_states)[token]  # every token runs: see the module docstring
            weighted = routed * top_k_weights[token, slot, None]
            out.index_add_(0, token, weighted.to(out.dtype))
        return out


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding experts as 3-D `gate_up_proj` and `down_proj` parameters, by name."""
    found = {}
    for name, module in model.named_modules():
        params = module._parameters
        gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
        if gate_up is not None and down is not None and gate_up.ndim == 3 and down.ndim == 3:
            found[name] = module
    return found


def unfuse_experts(model: nn.Module, tensor_names) -> list[str]:
    """Replace each fused experts module whose experts the checkpoint stores one tensor per
    projection (`tensor_names`) by `UnfusedExperts`; returns the names replaced. Biases, or
    experts stored fused, are left as they are (their experts are then not quantized)."""
    names = set(tensor_names)
    replaced = []
    for name, module in fused_experts(model).items():
        layout = next((n for n in EXPERT_NAMES if f"{name}.0.{n[0]}.weight" in names), None)
        biased = any(p is not None for k, p in module._parameters.items() if "bias" in k)
        if layout is None or biased:
            log.warning(
                "%s: experts %s; they are left unquantized",
                name,
                "with biases are not supported" if biased else "stored fused in the checkpoint",
            )
            continue
        count, double_inner, hidden = module.gate_up_proj.shape
        device = module.gate_up_proj.device
        with torch.device(device):
            experts = UnfusedExperts(
                ExpertMLP(layout, hidden, double_inner // 2, module.act_fn) for _ in range(count)
            )
        experts.to(module.gate_up_proj.dtype)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, experts)
        replaced.append(name)
    return replaced


def routers(modules: dict[str, nn.Module]) -> list[str]:
    """The routers beside unfused experts: modules of the experts' parent with a 2-D weight
    that are not Linears here (transformers' top-k routers), but are Linears to vLLM, which
    must find them in the checkpoint's `ignore` to read their weights unquantized."""
    out = []
    for name, module in modules.items():
        if not isinstance(module, UnfusedExperts):
            continue
        parent = name.rpartition(".")[0]
        for child, sub in modules[parent].named_children():
            weight = sub._parameters.get("weight")
            if weight is not None and weight.ndim == 2 and not isinstance(sub, nn.Linear):
                out.append(f"{parent}.{child}" if parent else child)
    return out
