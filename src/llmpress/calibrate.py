"""Static activation scales from calibration data, one decoder layer at a time.

For schemes whose input activations have static scales (FP8 and W8A8_STATIC: one scale per
tensor; NVFP4: a global scale under dynamic group scales), every quantized Linear's inputs are
observed as calibration batches flow through the layer runner: the running min and max over
all samples give the scale, by compressed-tensors' `calculate_qparams` (`generate_gparam` for
NVFP4's global scale), as for weights. Modules vLLM fuses into one GEMM (q/k/v, gate/up) read
the same input and get one shared range. The layer is then run again *compressed*
(dequantized weights, quantized inputs), so the next layer calibrates on what it will see at
inference. With `--kv-cache` (any weight scheme), a pass in between runs the compressed layer
and observes what each attention caches (llmpress.algorithms.kvcache); the last pass stores that in fp8.
With `propagate="original"` the observing pass runs the whole layer, uncompressed, and its
outputs are the next layer's inputs: one pass per layer instead of two or three, and every
statistic is the original model's (as a calibration forward of the whole model would give).

On a CPU without native 16-bit matrix units the layers are computed in float32: it runs float32
products several times faster than bfloat16 ones there, and bf16 values are exact in float32.
A CPU with AVX512-BF16 or AMX runs bf16 products ~2.5x faster than float32 ones, and computes a
bf16 checkpoint in bf16, as a GPU does (`compute_dtype`; `--compute-dtype float32` pins it).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

from llmpress.activations import ActivationCache
from llmpress.algorithms import Need, algorithms_of, pruner_named, quantizer_of, smoother_of
from llmpress.algorithms.awq import clip_search
from llmpress.algorithms.gptq import GPTQOptions, Hessian, gptq_quantize
from llmpress.algorithms.kvcache import KVCacheCalibration, attention_modules
from llmpress.algorithms.smoothing import (
    Mapping,
    SmoothingOptions,
    apply_scale,
    infer_mappings,
    load_tensors,
)
from llmpress.algorithms.sparsegpt import Pruning
from llmpress.data import CalibrationSet
from llmpress.errors import LlmpressError
from llmpress.memory import return_freed_memory
from llmpress.packing import installed_layout, layouts_differ
from llmpress.plan import Plan, default_propagation, fused_groups, sequential_allowed
from llmpress.quantize import check_finite, global_scales, layer_states, pack_states, scheme_format
from llmpress.runner import LayerRunner, StopLayer
from llmpress.sequential import Sequencer
from llmpress.source import ModelSource
from llmpress.sparsity import zero_fraction

log = logging.getLogger(__name__)

# Modules AWQ's clipping search leaves alone: queries and keys.
CLIP_SKIPPED = ("q_proj", "k_proj", "qkv_proj")


def needs_calibration(scheme: QuantizationScheme) -> bool:
    """Static input scales (or NVFP4's static global input scale) need calibration data."""
    acts = scheme.input_activations
    if acts is None:
        return False
    return acts.dynamic is False or acts.strategy == QuantizationStrategy.TENSOR_GROUP


@dataclass(frozen=True)
class Stage:
    """One modifier's part of each layer's work: the groups whose smoothing sites it smooths
    and the groups it quantizes (by config group name); `one_pass`: its next layer calibrates
    on the outputs of its observing pass (propagate "original"), not of a compressed pass."""

    smooths: frozenset[str]
    quantizes: frozenset[str]
    one_pass: bool = False
    sequential: bool = False  # one pass, each module on its compressed predecessors' outputs


def stages_of(plan: Plan, independent: bool, propagate: str | None = None) -> list[Stage]:
    """The stages of a calibrated run. By default one: each layer is observed once and every
    modifier works on it. `independent`: one stage per modifier, in recipe order (the
    smoothing modifier, then the quantization modifier), each calibrated on its own hidden
    states, as separate runs would be: a stage sees the modules of the stages before it
    compressed, and those of the stages after it original. `propagate`: every stage's, or
    None for each stage's default, as its run alone would take it ("original" for AWQ;
    `CompressOptions.propagation`)."""
    every = frozenset(g.name for g in plan.groups)
    smoothed = frozenset(g.name for g in plan.groups if smoother_of(g.method) is not None)
    kv = plan.kv_cache is not None

    def stage(smooths: frozenset[str], quantizes: frozenset[str], prunes: bool = False) -> Stage:
        methods = [g.method for g in plan.groups if g.name in quantizes]
        if prunes:  # pruning changes the function: the next layer sees it, as GPTQ's
            methods.append(plan.sparsity.method)
        algorithms = algorithms_of(methods)
        if not quantizes and not prunes:  # it only smooths, keeping the function: one pass
            mode = "compressed" if propagate == "compressed" else "original"  # gives the same
        else:
            mode = propagate or default_propagation(algorithms, kv)
        smoothing = algorithms_of(g.method for g in plan.groups if g.name in smooths)
        if mode == "sequential" and not sequential_allowed(algorithms + smoothing, kv):
            raise LlmpressError(
                "--propagate sequential compresses each module as soon as its inputs are "
                "seen; smoothing (AWQ, SmoothQuant) and --kv-cache need a whole layer "
                "observed first: use --propagate compressed"
            )
        return Stage(smooths, quantizes, mode == "original", mode == "sequential")

    if not independent:  # pruning (never independent) is the one stage's
        return [stage(smoothed, every, plan.sparsity is not None)]
    stages = []
    if smoothed:  # AWQ rounds the groups it smooths; SmoothQuant leaves them to the quantizer
        rounded = frozenset(
            g.name
            for g in plan.groups
            if (smoother := smoother_of(g.method)) is not None and smoother.quantizes_smoothed
        )
        stages.append(stage(smoothed, rounded))
    rest = every - (stages[0].quantizes if stages else frozenset())
    if rest:
        stages.append(stage(frozenset(), rest))
    return stages


def checkpoint_dtype(source: ModelSource, plan: Plan) -> torch.dtype:
    """The dtype the checkpoint stores its weights in: that of the first module planned."""
    return source.tensor_entries[f"{plan.modules[0]}.weight"].dtype


def compute_dtype(device: str, checkpoint_dtype: torch.dtype, choice: str = "auto") -> torch.dtype:
    """The dtype calibration computes in (`choice`: "auto", "float32" or "bfloat16")."""
    if choice != "auto":
        return getattr(torch, choice)
    if not device.startswith("cpu"):
        return checkpoint_dtype
    if checkpoint_dtype == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), through
    oneDNN: then bf16 products run ~2.5x faster than float32 ones, else several times slower."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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


class _InputObserver:
    """What calibration needs of each watched module's first input, over every sample: the
    running min and max (static scales) and/or the Hessian mean(x xᵀ) (GPTQ). Modules handed
    the same tensor (q/k/v, gate/up) are reduced once and share one Hessian. Once every
    watched module of a batch has been seen, the layer's forward is cut short (StopLayer):
    nothing after the last module's input is observed."""

    def __init__(
        self,
        names: list[str],
        ranges: bool = True,
        hessians: bool = False,
        device: str = "cpu",
        offload: bool = False,
        stop: bool = True,
        channels: bool = False,
        squares: bool = False,
    ):
        """`stop`: cut each batch's forward short once every module has been seen;
        `channels`: also per-channel statistics of each input (smoothing); `squares`: only
        their mean squares (Wanda)."""
        self.squares = squares
        self.ranges, self.device, self.offload, self.stop = ranges, device, offload, stop
        self.channels: dict[str, ChannelStats] | None = {} if channels or squares else None
        self.lo = dict.fromkeys(names, torch.tensor(float("inf")))
        self.hi = dict.fromkeys(names, torch.tensor(float("-inf")))
        self.hessians: dict[str, Hessian] | None = {} if hessians else None
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
                    x.shape[-1], x.device, extremes=not self.squares, squares=self.squares
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


def dequantized_weight(
    state: dict[str, torch.Tensor], scheme: QuantizationScheme, dtype: torch.dtype
) -> torch.Tensor:
    """A compressed module's weight as its readers reconstruct it, in `dtype`."""
    args = scheme.weights
    per_row = args.strategy in (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL)
    if "weight" in state and per_row and "weight_zero_point" not in state:
        # float-quantized / int-quantized: one scale per tensor or per output row.
        return (state["weight"].to(torch.float32) * state["weight_scale"].to(torch.float32)).to(
            dtype
        )
    compressor = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    stored = {k: v for k, v in state.items() if k.startswith("weight")}
    return compressor.decompress(stored, scheme)["weight"].to(dtype)


def served_zeros(state: dict[str, torch.Tensor], scheme: QuantizationScheme | None) -> float:
    """The fraction of a stored module's weight that is zero as readers reconstruct it
    (`scheme` None: stored dense); pruned weights, and any rounded to zero."""
    weight = state["weight"] if scheme is None else dequantized_weight(state, scheme, torch.float32)
    return round(zero_fraction(weight), 6)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """Quantize-dequantize with one static symmetric scale, as vLLM does (round to nearest
    even, saturate): compressed-tensors' fake_quantize, without its general machinery."""
    scaled = x / scale
    if args.type == QuantizationType.FLOAT:
        fmax = torch.finfo(torch.float8_e4m3fn).max
        q = scaled.clamp_(-fmax, fmax).to(torch.float8_e4m3fn).to(x.dtype)
    else:
        qmax = 2 ** (args.num_bits - 1)
        q = scaled.round_().clamp_(-qmax, qmax - 1)
    return q.mul_(scale)


@contextlib.contextmanager
def _hooked(hooks: list) -> Iterator[None]:
    """Hooks in place for a block, removed after it (added to `hooks` inside it: removed too)."""
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


class _InputQuantizer:
    """Forward pre-hooks that quantize each module's input as it will be at inference; a
    tensor handed to several modules with the same scales is quantized once."""

    def __init__(self, args: QuantizationArgs):
        self.args = args
        self._last: tuple[torch.Tensor | None, object, torch.Tensor | None] = (None, None, None)

    def hook(self, params: dict[str, torch.Tensor]):
        # By value: fused siblings (q/k/v, gate/up) hold equal scales in tensors of their own,
        # and their shared input is then quantized once.
        key = tuple(float(v) for v in params.values())

        def quantize_input(module, args):
            x = args[0]
            if self._last[0] is not x or self._last[1] != key:
                self._last = (x, key, self._quantize(x, params))
            return (self._last[2], *args[1:])

        return quantize_input

    def _quantize(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        args = self.args
        if not params:  # dynamic (FP8_DYNAMIC, W8A8): scales per call, as served
            scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
            return fake_quantize(x, scale, zero_point, args)
        if "input_global_scale" in params:  # NVFP4: group scales at run time, global static
            gscale = params["input_global_scale"].to(x.device)
            scale, zero_point = compute_dynamic_scales_and_zp(
                value=x, args=args, module=None, global_scale=gscale
            )
            return fake_quantize(x, scale, zero_point, args, global_scale=gscale)
        scale = params["input_scale"].to(x.device, x.dtype)
        if args.symmetric:
            return quantize_static(x, scale, args)
        return fake_quantize(x, scale, params["input_zero_point"].to(x.device), args)


class StaticCalibration:
    """Compresses each decoder layer's planned modules and adds their input scales, and the
    k/v scales of its attention with `--kv-cache`."""

    def __init__(
        self,
        source: ModelSource,
        plan: Plan,
        calibration: CalibrationSet,
        device: str,
        caches: list[ActivationCache] | None = None,
        resumed: bool = False,
        gptq: GPTQOptions | None = None,
        offload_hessians: bool = False,
        propagate: str | None = None,
        smoothing: SmoothingOptions | None = None,
        compute: str = "auto",
        stages: list[Stage] | None = None,
    ):
        """`caches`: where each stage's hidden states live between layers (one per stage);
        `resumed`: they already hold the inputs of the first layer still to run;
        `gptq`: solve the weights by GPTQ on the layer's inputs; `propagate`: what the next
        layer sees, the "compressed" layer's outputs or the "original" one's; `smoothing`:
        AWQ or SmoothQuant scales applied before the weights are quantized; `compute`: the
        compute dtype's choice (`compute_dtype`); `stages`: the modifiers' parts of each layer's
        work, each on its own hidden states (`stages_of`; default: one stage, all of it)."""
        # Static input scales for some group; else only the KV cache needs the data.
        self.static = any(needs_calibration(g.scheme) for g in plan.groups)
        outside = [m for m in plan.modules if source.layer_of(f"{m}.weight") is None]
        if self.static and outside:
            raise LlmpressError(
                f"static activation scales are computed inside decoder layers; {outside[0]} is "
                "outside them: --ignore it"
            )
        self.plan, self.device = plan, device
        self.kv = KVCacheCalibration(plan.kv_cache) if plan.kv_cache is not None else None
        self.checkpoint_dtype = checkpoint_dtype(source, plan)
        dtype = compute_dtype(device, self.checkpoint_dtype, compute)
        self.stages = stages if stages is not None else stages_of(plan, False, propagate)
        self.caches = caches if caches is not None else [ActivationCache()]
        if len(self.caches) != len(self.stages):
            raise ValueError(f"{len(self.stages)} stages need as many caches")
        self.runner = LayerRunner(source, device, dtype=dtype, cache=self.caches[0])
        self.runner.capture(calibration.samples, hidden=not resumed)
        if not resumed:  # every stage starts from the embeddings' outputs
            for cache in self.caches[1:]:
                for i in range(len(self.runner.batches)):
                    cache.put(i, self.caches[0].get(i))
                cache.advance()
        self.gptq = gptq  # GPTQOptions: weights by GPTQ instead of round-to-nearest
        self.offload_hessians = offload_hessians
        self.smoothing = smoothing
        self.pruner = pruner_named(plan.sparsity.method) if plan.sparsity is not None else None
        self.mappings: list[Mapping] | None = None  # inferred on the first layer run
        # For the manifest: GPTQ's report per module, smoothing's per site and layer.
        self.report: dict[str, dict] = {"gptq": {}, "smoothing": {}}

    @property
    def generation(self) -> int:
        return self.runner.cache.generation

    def close(self) -> None:
        for cache in self.caches:
            cache.close()

    def compress(
        self,
        index: int,
        weights: dict[str, torch.Tensor],
        others: dict[str, torch.Tensor],
        observer: str,
        layout,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Layer `index`: observe its inputs, compress `weights` (by module name), run it
        compressed. `others`: the layer's remaining tensors (norms...), by full name. With
        several stages, each runs on its own hidden states, with the modules of the stages
        before it compressed and those of the stages after it still original."""
        read = {**others, **{f"{name}.weight": w for name, w in weights.items()}}
        layer = self.runner.load_layer(index, read)
        if self.smoothing is not None and self.mappings is None:
            self.mappings = self._infer_mappings(index, layer, weights)
        packed: dict[str, dict[str, torch.Tensor]] = {}
        held: list = []  # input quantizers of the modules earlier stages compressed
        with _hooked(held):
            for k, stage in enumerate(self.stages):
                self.runner.cache = self.caches[k]
                last = k == len(self.stages) - 1
                done, readable = self._stage(
                    index, layer, stage, weights, others, observer, layout, last
                )
                if not last:  # the next stages run with these modules compressed
                    held += self._load_compressed(readable)
                packed |= done
        self.runner.unload_layer(index)
        return packed

    def _stage(
        self, index, layer, stage: Stage, weights, others, observer, layout, last: bool
    ) -> tuple[dict, dict]:
        """One stage's work on the resident layer: observe, smooth, compress its modules, and
        give its hidden states their next generation. Returns the modules' stored tensors
        (and, on the last stage with --kv-cache, the attentions' k/v scales), and the same
        weights as the installed compressed-tensors reads them (`_decompressible`)."""
        plan = self.plan
        part = {n: w for n, w in weights.items() if self._in_stage(n, stage, last)}
        watched = [
            n
            for n in weights
            if n in part or plan.quantized(n) and plan.group_of(n).name in stage.smooths
        ]
        pruned = [n for n in part if plan.pruned(n)]
        # What this stage's algorithms need observed of their modules' inputs.
        needs = self.smoothing.method.needs if stage.smooths else Need.NOTHING
        for name in part:
            if plan.quantized(name):
                needs |= quantizer_of(plan.method_of(name)).needs
        if pruned:
            needs |= self.pruner.needs
        kv = self.kv if last else None
        watch = None
        hooks = []
        if self.static or needs & (Need.HESSIAN | Need.CHANNELS | Need.INPUT_NORMS):
            watch = _InputObserver(
                watched,
                ranges=self.static,
                hessians=bool(needs & Need.HESSIAN),
                device=self.device,
                offload=self.offload_hessians,
                stop=not (stage.one_pass or stage.sequential),
                channels=bool(needs & Need.CHANNELS),
                squares=bool(needs & Need.INPUT_NORMS),  # pruning never smooths
            )
            hooks = [
                self.runner.modules[n].register_forward_pre_hook(watch.hook(n)) for n in watched
            ]
            if not stage.sequential:  # there the batches interleave: inputs known per layer
                hooks.append(layer.register_forward_pre_hook(watch.start))
        if stage.sequential:  # observed, compressed and run in one pass (llmpress.sequential)
            with _hooked(hooks):
                packed, readable = self._sequential(index, part, watch, observer, layout)
        else:
            attentions = None
            if stage.one_pass and kv is not None:
                prefix = f"{self.runner.source.layer_prefix}.{index}."
                attentions = attention_modules(layer, prefix)
                hooks += kv.observe(attentions)
            if hooks:  # none: only the KV cache is calibrated, in the compressed passes below
                with _hooked(hooks):
                    self.runner.forward_layer(index, update=stage.one_pass)
            elif stage.one_pass:
                self.runner.forward_layer(index)
            if stage.smooths:  # `weights` takes the smoothed values
                self._smooth(index, layer, stage, weights, others, watch, observer)
            smoothed = {n: weights[n] for n in part}
            packed, states = self._compress_part(smoothed, watch, observer, layout)
            readable = self._decompressible(packed, states, layout)
        self._record_sparsity(pruned, readable)
        if stage.one_pass:
            if attentions is not None:
                packed.update(kv.scales(attentions, self.checkpoint_dtype))
        elif not stage.sequential:
            self._run_compressed(index, layer, packed, readable, kv)
        return packed, readable

    def _compress_part(self, weights, watch, observer, layout) -> tuple[dict, dict]:
        """Prune and quantize modules `weights` (by name) on what `watch` observed of their
        inputs: their stored tensors (packed) and their solved states, by module."""
        plan, pruner = self.plan, self.pruner
        pruned = [n for n in weights if plan.pruned(n)]
        masks = self._masks({n: weights[n] for n in pruned}, watch) if pruned else {}
        states, packed = {}, {}
        for group, members in plan.by_group(weights):  # one group at a time
            scheme = group.scheme
            # Solved on the Hessians: GPTQ's groups (SparseGPT's pruned modules pruned first,
            # on the same Hessian); rounded to nearest: the others, pruned first by SparseGPT
            # or by their masks (Wanda's, magnitude's), as llm-compressor's pruning modifier
            # then its QuantizationModifier.
            solve = members if quantizer_of(group.method).solves else []
            rest = {m: weights[m] for m in members if m not in solve}
            first = [m for m in rest if pruner is not None and pruner.solved and plan.pruned(m)]
            if first:
                mine = {m: weights[m] for m in first}
                done = self._gptq_states(mine, None, watch.hessians, observer, masks)
                rest.update((m, done[m]["weight"].to(weights[m].dtype)) for m in first)
            solved = {}
            if solve:
                mine = {m: weights[m] for m in solve}
                solved |= self._gptq_states(mine, scheme, watch.hessians, observer, masks)
            if rest:
                solved |= layer_states(
                    _masked(rest, masks), scheme, plan.fused, observer, self.device
                )
            states |= solved
            packed |= pack_states(solved, scheme, layout)
            if needs_calibration(scheme):
                for name in members:
                    packed[name].update(self._input_params(name, watch, weights[name].dtype))
        unquantized = {n: weights[n] for n in pruned if not plan.quantized(n)}
        if unquantized:  # pruned only: stored dense, in the checkpoint's dtype
            if pruner.solved:
                solved = self._gptq_states(unquantized, None, watch.hessians, observer, masks)
            else:
                solved = {n: {"weight": w} for n, w in _masked(unquantized, masks).items()}
            for name, state in solved.items():
                states[name] = state
                packed[name] = {"weight": state["weight"].to(weights[name].dtype).cpu()}
        return packed, states

    def _sequential(self, index, part, watch, observer, layout) -> tuple[dict, dict]:
        """Run layer `index` once, each module of `part` compressed as soon as every batch
        has reached it (with the fused siblings that read its input), so that each calibrates
        on the outputs of the compressed modules before it; the layer's outputs are then the
        next layer's inputs. Returns the modules' stored tensors, and the same as the
        installed compressed-tensors reads them (`_decompressible`)."""
        packed, readable, quantizers = {}, {}, []
        # Siblings vLLM fuses read one input: solved together, on one Hessian (as in two
        # passes), pruned-only ones too (plan.fused holds the quantized ones).
        siblings = fused_groups(tuple(part))

        def compress(name: str) -> list[str]:
            members = [m for m in siblings[name] if m not in packed]
            if watch is not None:
                watch.share(name, members)
            done, solved = self._compress_part(
                {m: part[m] for m in members}, watch, observer, layout
            )
            packed.update(done)
            ready = self._decompressible(done, solved, layout)
            readable.update(ready)
            # The batches go on through these modules as they will be served.
            quantizers.extend(self._load_compressed(ready))
            return_freed_memory()  # the solve's temporaries, and the holes they leave
            return members

        sequencer = Sequencer({n: self.runner.modules[n] for n in part})
        with _hooked(quantizers):
            self.runner.forward_layer_sequential(index, sequencer, compress)
        uncalled = {n: w for n, w in part.items() if n not in packed}
        if uncalled:  # modules no batch ran (GPTQ refuses them, as in two passes)
            done, solved = self._compress_part(uncalled, watch, observer, layout)
            packed.update(done)
            readable.update(self._decompressible(done, solved, layout))
        return packed, readable

    def _in_stage(self, name: str, stage: Stage, last: bool) -> bool:
        """Whether `stage` compresses module `name`: its group's stage; a module that is
        only pruned, the last stage's."""
        if self.plan.quantized(name):
            return self.plan.group_of(name).name in stage.quantizes
        return last

    def _masks(self, weights: dict[str, torch.Tensor], watch) -> dict[str, torch.Tensor]:
        """The masks chosen before quantization (Wanda's, magnitude's), by module; SparseGPT
        chooses its own in the solve."""
        sparsity, pruner = self.plan.sparsity, self.pruner
        if pruner.solved:
            return {}
        masks = {}
        for name, weight in weights.items():
            target = sparsity.modules[name]
            check_finite(f"{name}.weight", weight)
            norms = watch.channels[name].rms() if pruner.needs & Need.INPUT_NORMS else None
            masks[name] = pruner.mask(weight, norms, target, sparsity.structure)
        return masks

    def _record_sparsity(self, pruned: list[str], readable: dict) -> None:
        """Each pruned module's fraction of zeros as served, for the manifest."""
        report = self.report.setdefault("sparsity", {})
        for name in pruned:
            scheme = self.plan.scheme_of(name) if self.plan.quantized(name) else None
            report[name] = served_zeros(readable[name], scheme)

    def _gptq_states(
        self,
        weights: dict[str, torch.Tensor],
        scheme: QuantizationScheme | None,
        hessians: dict[str, Hessian],
        observer: str,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """GPTQ-solved states of one layer's modules of one scheme (None: pruned only).
        Modules sharing a Hessian are solved together, stacked by rows, where their parameters
        are per row or group. Pruned modules are pruned on the same Hessian: by SparseGPT, or
        by their fixed `masks` (Wanda's, magnitude's), the solve compensating the removals."""
        device = self.device
        args = scheme.weights if scheme is not None else None
        on_device = {n: w.to(device) for n, w in weights.items()}
        gscales = global_scales(on_device, scheme, self.plan.fused) if scheme else {}
        stackable = args is None or args.strategy in (
            QuantizationStrategy.CHANNEL,
            QuantizationStrategy.GROUP,
            QuantizationStrategy.TENSOR_GROUP,
        )
        groups: dict[int, list[str]] = {}
        for name in weights:
            if name not in hessians:
                raise LlmpressError(f"{name} saw no calibration input; GPTQ cannot solve it")
            # Pruned and unpruned modules are solved apart (a share of a mixed stack is not
            # its own module's sparsity).
            key = (id(hessians[name]), self.plan.pruned(name))
            groups.setdefault(key, []).append(name)
        if stackable:
            solves = list(groups.values())
        else:  # per-tensor or per-block parameters: each module alone, on the shared Hessian
            solves = [[n] for members in groups.values() for n in members]
        states: dict[str, dict[str, torch.Tensor]] = {}
        for members in solves:
            hessian = hessians[members[0]].mean(device)
            stacked = torch.cat([on_device[m] for m in members])
            for m in members:
                check_finite(f"{m}.weight", on_device[m])
            result = gptq_quantize(
                stacked,
                hessian,
                args,
                self.gptq or GPTQOptions(),
                observer,
                gscales.get(members[0]),
                on_device[members[0]].dtype,
                self._pruning(members, on_device, masks or {}),
            )
            start = 0
            for m in members:
                rows = slice(start, start + on_device[m].shape[0])
                start = rows.stop
                state = {
                    "weight": result.weight[rows],
                    "weight_scale": _rows(result.scale, rows),
                    "weight_zero_point": _rows(result.zero_point, rows),
                }
                if m in gscales:
                    state["weight_global_scale"] = gscales[m].clone()
                if result.g_idx is not None:
                    state["weight_g_idx"] = result.g_idx
                states[m] = state
                baseline = "loss_magnitude" if self.plan.pruned(m) else "loss_rtn"
                by = quantizer_of(self.plan.method_of(m)) if scheme is not None else self.pruner
                section = by.manifest
                self.report.setdefault(section, {})[m] = {
                    "solved_with": members,
                    baseline: result.loss_rtn,
                    "loss": result.loss,
                    "damping": result.damping,
                    "seconds": round(result.seconds, 3),
                }
                for note in result.notes:
                    log.warning("%s: %s", m, note)
            del hessian
        return states

    def _pruning(self, members: list[str], weights, masks) -> Pruning | None:
        """What the solve of `members` (stacked) prunes, or None."""
        sparsity = self.plan.sparsity
        if not self.plan.pruned(members[0]):
            return None
        rows, start = [], 0
        for m in members:
            rows.append(slice(start, start + weights[m].shape[0]))
            start = rows[-1].stop
        fixed = torch.cat([masks[m] for m in members]) if masks else None
        target = sparsity.modules[members[0]]  # one layer's modules: one target
        return Pruning(sparsity.structure, target, tuple(rows), fixed)

    def _infer_mappings(self, index: int, layer, weights) -> list[Mapping]:
        """The layer's smoothing sites (the same in every layer), found on one real forward."""
        prefix = f"{self.runner.source.layer_prefix}.{index}."
        balance = {name[len(prefix) :] for name in weights}
        config = self.runner.source.config
        head_dim = getattr(config, "head_dim", None)
        if head_dim is None and getattr(config, "num_attention_heads", None):
            head_dim = config.hidden_size // config.num_attention_heads
        found = infer_mappings(layer, balance, lambda: self.runner.forward_batch(index), head_dim)
        mappings = [m for m in found.mappings if self.smoothing.wants(m)]
        left = [m.name for m in found.mappings if not self.smoothing.wants(m)]
        for reason in found.skipped:
            log.warning("%s: mapping skipped: %s", self.smoothing.method, reason)
        if not mappings:
            raise LlmpressError(
                f"{self.smoothing.method}: no smoothing mapping applies to this model's layers"
                + (f" ({'; '.join(found.skipped)})" if found.skipped else "")
            )
        log.info("%s mappings: %s", self.smoothing.method, ", ".join(m.name for m in mappings))
        unused = [f"{name}: not used by {self.smoothing.method}" for name in left]
        self.report["smoothing"].update(
            method=self.smoothing.method.name,
            mappings=[m.name for m in mappings],
            skipped=found.skipped + unused,
        )
        self.report["smoothing"].setdefault("sites", {})
        return mappings

    def _smooth(
        self, index, layer, stage: Stage, weights, others, watch: _InputObserver, observer
    ) -> None:
        """Choose and apply each mapping's scales, in order: `weights` and `others` (the
        checkpoint's tensors, written later) and the resident layer take the smoothed values,
        and the observed statistics become those of the smoothed inputs."""
        prefix = f"{self.runner.source.layer_prefix}.{index}."
        tensors = {f"{n[len(prefix) :]}.weight": w for n, w in weights.items()}
        tensors.update({k[len(prefix) :]: v for k, v in others.items() if k.startswith(prefix)})
        before = dict(tensors)
        options, device = self.smoothing, self.device
        for mapping in self.mappings:
            members = [prefix + b for b in mapping.balance]
            if self.plan.group_of(members[0]).name not in stage.smooths:
                continue  # its readers' group is not smoothed (several methods in one run)
            stats = watch.channels[members[0]]
            balance = [tensors[f"{b}.weight"].to(device, torch.float32) for b in mapping.balance]
            scale, entry = options.method.choose_scale(
                mapping,
                balance,
                stats,
                lambda: watch.hessians[members[0]].mean(device),  # noqa: B023 - called at once
                self.plan.scheme_of(members[0]).weights,
                observer,
                self.checkpoint_dtype,
                options,
            )
            entry["scale_range"] = [float(scale.min()), float(scale.max())]
            self.report["smoothing"]["sites"][f"{prefix}{mapping.smooth}"] = entry
            apply_scale(mapping, scale, tensors)
            columns = mapping.expand(scale)
            stats.divide(columns)
            if watch.hessians is not None:  # each its own object where experts read copies
                held = (watch.hessians[m] for m in members if m in watch.hessians)
                for hessian in {id(h): h for h in held}.values():
                    hessian.divide(columns)
            if self.static:
                for m in members:
                    watch.lo[m], watch.hi[m] = stats.lo.min().cpu(), stats.hi.max().cpu()
        for name in weights:
            weights[name] = tensors[f"{name[len(prefix) :]}.weight"]
        if options.method.clips and options.clip:
            self._clip(weights, watch, observer)
        changed = {k: v for k, v in tensors.items() if v is not before[k]}
        for key, value in changed.items():
            if prefix + key in others:
                others[prefix + key] = value
        load_tensors(layer, {k: self.runner.placed(v) for k, v in changed.items()})

    def _clip(self, weights, watch: _InputObserver, observer) -> None:
        """AWQ's clipping search on the smoothed weights, but for q and k (their error passes
        through the attention softmax, which the output error does not see)."""
        clipped = self.report["smoothing"].setdefault("clip", {})
        for name, weight in weights.items():
            clipped_by = smoother_of(self.plan.method_of(name))
            if name.rsplit(".", 1)[-1] in CLIP_SKIPPED or clipped_by is not self.smoothing.method:
                continue
            hessian = watch.hessians[name].mean(self.device)
            result = clip_search(
                weight.to(self.device, torch.float32),
                hessian,
                self.plan.scheme_of(name).weights,
                observer,
                self.checkpoint_dtype,
            )
            weights[name] = result.weight.to(weight.dtype)
            clipped[name] = {
                "mean_shrink": round(result.mean_shrink, 4),
                "loss_before": result.loss_before,
                "loss": result.loss,
            }

    def _input_params(
        self, name: str, ranges: _InputObserver, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The stored tensors of module `name`'s input quantization."""
        fused = tuple(m for m in self.plan.fused.get(name, (name,)) if m in ranges.lo)
        lo, hi = ranges.shared(fused)
        args = self.plan.scheme_of(name).input_activations
        if args.strategy == QuantizationStrategy.TENSOR_GROUP:
            return {"input_global_scale": generate_gparam(lo, hi).reshape(1)}
        scale, zero_point = calculate_qparams(lo, hi, args)
        params = {"input_scale": scale.to(dtype).reshape(1)}
        if not args.symmetric:
            params["input_zero_point"] = zero_point.reshape(1)
        return params

    def _load_compressed(self, readable) -> list:
        """Give the resident layer's modules their weights as they will be served (dequantized)
        and quantize their inputs as served; returns the input quantizers' hooks."""
        modules = self.runner.modules
        quantizers: dict[int, _InputQuantizer] = {}  # one per scheme's input arguments
        hooks = []
        for name, state in readable.items():
            module = modules[name]
            if not self.plan.quantized(name):  # pruned only: stored as it is served
                module.weight.data = state["weight"].to(module.weight.device, module.weight.dtype)
                continue
            scheme = self.plan.scheme_of(name)
            weight = dequantized_weight(state, scheme, module.weight.dtype)
            module.weight.data = weight.to(module.weight.device)
            if scheme.input_activations is not None:
                quantizer = quantizers.setdefault(
                    id(scheme), _InputQuantizer(scheme.input_activations)
                )
                params = {k: v for k, v in state.items() if k.startswith("input_")}
                hooks.append(module.register_forward_pre_hook(quantizer.hook(params)))
        return hooks

    def _run_compressed(self, index: int, layer, packed, readable, kv) -> None:
        """Run the layer as it will be served (dequantized weights, quantized inputs, and with
        --kv-cache its keys and values in fp8), so the next layer sees its real inputs."""
        hooks = self._load_compressed(readable)
        with _hooked(hooks):
            if kv is not None:
                # What the compressed layer caches: observed, then stored in fp8 as the next
                # layer's inputs are computed.
                prefix = f"{self.runner.source.layer_prefix}.{index}."
                attentions = attention_modules(layer, prefix)
                with _hooked(kv.observe(attentions)):
                    self.runner.forward_layer(index, update=False)
                kv_scales = kv.scales(attentions, self.checkpoint_dtype)
                hooks += kv.quantize(attentions, kv_scales)
                packed.update(kv_scales)  # by attention module: its k_scale and v_scale
            self.runner.forward_layer(index)

    def _decompressible(self, packed, states, layout):
        """`packed`, or for odd bit widths packed for another compressed-tensors (--packing),
        the same weights packed as the installed one reads them."""
        if layout == installed_layout():
            return packed
        readable = dict(packed)
        for scheme, members in self.plan.by_scheme(packed):
            args = scheme.weights
            if args.type == "int" and layouts_differ(args.num_bits):
                part = {m: states[m] for m in members}
                readable |= pack_states(part, scheme, installed_layout())
        return readable


def _masked(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict:
    """`weights` with their masks' weights set to zero (those without a mask as they are)."""
    return {
        n: w.masked_fill(masks[n].to(w.device), 0) if n in masks else w for n, w in weights.items()
    }


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows of a per-row (channel or group) parameter; a per-tensor one is shared."""
    if tensor is None or tensor.numel() == 1:
        return tensor
    return tensor[rows]
