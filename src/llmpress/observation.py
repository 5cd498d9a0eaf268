"""What a calibration pass observes of each module's input, as the layer's algorithms need it
(llmpress.algorithms.base.Need): running ranges (static scales), Hessians (GPTQ, SparseGPT,
AWQ), per-channel statistics (smoothing) and mean squares (Wanda). A tensor that several
modules read (q/k/v, gate/up, a layer's experts) is reduced once for all of them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from llmpress.algorithms.base import Need
from llmpress.algorithms.gptq import Hessian
from llmpress.errors import LlmpressError
from llmpress.runner import StopLayer


class ChannelStats:
    """Per-channel statistics of a module input over every token: min, max and mean |x|
    (what smoothing needs), and the root mean square (Wanda's input norms); a smoothed input
    x / s is followed by `divide(s)`."""

    def __init__(self, channels: int, device, extremes: bool = True, squares: bool = False):
        """`extremes`: min, max and mean |x| (smoothing); `squares`: the mean square (Wanda)."""
        self.extremes, self.squares = extremes, squares
        self.lo = torch.full((channels,), float("inf"), device=device)
        self.hi = torch.full((channels,), float("-inf"), device=device)
        self.abs_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.square_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if self.extremes:
            lo, hi = torch.aminmax(x, dim=0)
            self.lo = torch.minimum(self.lo, lo.float())
            self.hi = torch.maximum(self.hi, hi.float())
            self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        if self.squares:  # one batch summed in float32 (vectorized), the batches in float64
            x = x.float()
            self.square_sum += (x * x).sum(dim=0).double()
        self.tokens += x.shape[0]

    def rms(self) -> torch.Tensor:
        return (self.square_sum / max(self.tokens, 1)).sqrt().float()

    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.hi.abs(), self.lo.abs())

    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()

    def divide(self, scale: torch.Tensor) -> None:
        scale = scale.to(self.lo.device)
        self.lo, self.hi = self.lo / scale, self.hi / scale
        self.abs_sum = self.abs_sum / scale.double()
        self.square_sum = self.square_sum / scale.double().square()


@dataclass
class _Input:
    """One input tensor of a batch: its range, and the Hessians and statistics it was added to."""

    ref: weakref.ref
    range: tuple[torch.Tensor, torch.Tensor] | None = None
    fed: dict = field(default_factory=dict)


class InputObserver:
    """What calibration needs of each watched module's first input, over every sample: the
    running min and max (static scales) and/or the Hessian mean(x xᵀ) (GPTQ). Modules handed
    the same tensor (q/k/v, gate/up) are reduced once and share one Hessian. Once every
    watched module of a batch has been seen, the layer's forward is cut short (StopLayer):
    nothing after the last module's input is observed."""

    def __init__(
        self,
        names: list[str],
        needs: Need = Need.RANGES,
        device: str = "cpu",
        offload: bool = False,
        stop: bool = True,
    ):
        """`needs`: what the layer's algorithms (and static scales: RANGES) ask observed of
        the modules `names`; CHANNELS and INPUT_NORMS are per-channel statistics of each input
        (smoothing), or only their mean squares (Wanda); `offload`: Hessians kept in host
        memory; `stop`: cut each batch's forward short once every module has been seen."""
        self.extremes = bool(needs & Need.CHANNELS)
        self.squares = bool(needs & Need.INPUT_NORMS)
        self.ranges = bool(needs & Need.RANGES)
        self.device, self.offload, self.stop = device, offload, stop
        self.channels: dict[str, ChannelStats] | None = (
            {} if self.extremes or self.squares else None
        )
        self.lo = dict.fromkeys(names, torch.tensor(float("inf")))
        self.hi = dict.fromkeys(names, torch.tensor(float("-inf")))
        self.hessians: dict[str, Hessian] | None = {} if needs & Need.HESSIAN else None
        self._inputs: dict[int, _Input] = {}  # this batch's inputs, by id
        self._unseen = set(names)
        self._sharing: dict[str, str] = {}  # module: the fused sibling whose input it reads

    def _input(self, x: torch.Tensor) -> _Input:
        """What this batch has done with tensor `x` so far: a tensor handed to several modules
        (q/k/v, gate/up, every expert of a layer) is reduced once. Known by weak reference: a
        freed tensor's id can be reused, and its entry then no longer matches."""
        entry = self._inputs.get(id(x))
        if entry is None or entry.ref() is not x:
            entry = _Input(weakref.ref(x))
            if self.ranges:
                entry.range = (x.min().float().cpu(), x.max().float().cpu())
            self._inputs[id(x)] = entry
        return entry

    def hook(self, name: str):
        def observe(module, args):
            x = args[0]
            if name in self._sharing:  # compressed with its sibling, on the sibling's inputs
                known = self._inputs.get(id(x))
                if known is None or known.ref() is not x:
                    raise LlmpressError(
                        f"{name} does not read the input of {self._sharing[name]}, which it is "
                        "fused with; use --propagate compressed"
                    )
                return
            entry = self._input(x)
            if self.ranges:
                lo, hi = entry.range
                self.lo[name] = torch.minimum(self.lo[name], lo)
                self.hi[name] = torch.maximum(self.hi[name], hi)
            if self.hessians is not None:
                self._feed(name, x, entry.fed)
            if self.channels is not None:
                self._feed_channels(name, x, entry.fed)
            self._unseen.discard(name)
            if self.stop and not self._unseen:
                raise StopLayer

        return observe

    def _feed(self, name: str, x: torch.Tensor, fed: dict) -> None:
        """`fed`: what `x` was added to in this batch."""
        hessian = self.hessians.get(name)
        if hessian is None:  # first batch: share the Hessian of a module given this tensor
            shared = fed.get("hessian")
            hessian = shared if shared is not None else Hessian(x.shape[-1], x.device, self.offload)
            self.hessians[name] = hessian
        if id(hessian) not in fed:
            hessian.add(x)
            fed[id(hessian)] = fed["hessian"] = hessian

    def _feed_channels(self, name: str, x: torch.Tensor, fed: dict) -> None:
        stats = self.channels.get(name)
        if stats is None:  # first batch: share the statistics of a module given this tensor
            stats = fed.get("channels")
            if stats is None:
                stats = ChannelStats(
                    x.shape[-1], x.device, extremes=self.extremes, squares=self.squares
                )
            self.channels[name] = stats
        if ("channels", id(stats)) not in fed:
            stats.add(x)
            fed[("channels", id(stats))] = fed["channels"] = stats

    def start(self, layer, args) -> None:
        """A pre-hook on the layer: a batch begins, every module is still to be seen (a
        module that runs for some batches only, as an unrouted expert, never cuts one short)."""
        self._unseen = set(self.lo)
        self._inputs = {}

    def share(self, name: str, members: list[str]) -> None:
        """`members` (fused with `name`: q/k/v, gate/up) read `name`'s input, and are
        compressed before their own calls: `name`'s statistics become theirs, and each of their
        calls is checked to read an input already seen."""
        for member in members:
            if member == name:
                continue
            if self.hessians is not None:
                self.hessians[member] = self.hessians[name]
            if self.channels is not None:
                self.channels[member] = self.channels[name]
            self.lo[member], self.hi[member] = self.lo[name], self.hi[name]
            self._sharing[member] = name

    def shared(self, members: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.stack([self.lo[m] for m in members]).min()
        hi = torch.stack([self.hi[m] for m in members]).max()
        return lo.reshape(1), hi.reshape(1)
