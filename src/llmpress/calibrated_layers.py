"""The calibrated layer loop's work on one decoder layer: observe its modules' inputs, then
transform, prune and quantize them (each by the algorithms the plan gives their group), add
static input scales and the KV cache's, and run the layer again compressed, so that the next
layer calibrates on what it will see when served.

For schemes whose input activations have static scales (FP8 and W8A8_STATIC: one scale per
tensor; NVFP4: a global scale under dynamic group scales), the running min and max of every
quantized Linear's inputs give the scale, by compressed-tensors' `calculate_qparams`
(`generate_gparam` for NVFP4's global scale), as for weights. Modules vLLM fuses into one GEMM
(q/k/v, gate/up) read the same input and get one shared range. With `--kv-cache`, a pass in
between runs the compressed layer and observes what each attention caches
(llmpress.algorithms.kvcache); the last pass stores that in fp8. With `propagate="original"`
the observing pass runs the whole layer, uncompressed, and its outputs are the next layer's
inputs: one pass per layer instead of two or three. Stages (several modifiers, each on its own
hidden states) are llmpress.stages; what is observed, llmpress.observation; the layer as served,
llmpress.served.
The algorithms' own work on the resident layer is theirs (llmpress.algorithms: a Smoother's
`apply`, a Pruner's `masks` and `prune`, a Quantizer's `quantize`, on a LayerContext); this
module orders it by role, and runs the passes.
"""

from __future__ import annotations

import logging

import torch
from compressed_tensors.quantization import (
    QuantizationStrategy,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from llmpress.activations import ActivationCache
from llmpress.algorithms import Need, quantizer_of
from llmpress.algorithms.base import LayerContext
from llmpress.algorithms.kvcache import KVCacheCalibration, attention_modules
from llmpress.config import CompressOptions
from llmpress.data import CalibrationSet
from llmpress.errors import LlmpressError
from llmpress.memory import return_freed_memory
from llmpress.observation import InputObserver
from llmpress.packing import installed_layout, layouts_differ
from llmpress.plan import Plan, fused_groups
from llmpress.quantize import pack_states
from llmpress.runner import LayerRunner
from llmpress.sequential import Sequencer
from llmpress.served import InputQuantizer, dequantized_weight, hooked, served_zeros
from llmpress.source import ModelSource
from llmpress.stages import Stage, checkpoint_dtype, compute_dtype, needs_calibration, stages_of

log = logging.getLogger(__name__)


class CalibratedLayers:
    """Compresses each decoder layer's planned modules and adds their input scales, and the
    k/v scales of its attention with `--kv-cache`."""

    def __init__(
        self,
        source: ModelSource,
        plan: Plan,
        calibration: CalibrationSet,
        options: CompressOptions,
        caches: list[ActivationCache] | None = None,
        resumed: bool = False,
        stages: list[Stage] | None = None,
    ):
        """`options`: the run's (each algorithm takes its settings from them); `caches`:
        where each stage's hidden states live between layers (one per stage); `resumed`: they
        already hold the inputs of the first layer still to run; `stages`: the modifiers'
        parts of each layer's work, each on its own hidden states (`stages_of`; default: one
        stage, all of it)."""
        # Static input scales for some group; else only the KV cache needs the data.
        self.static = any(needs_calibration(g.scheme) for g in plan.groups)
        outside = [m for m in plan.modules if source.layer_of(f"{m}.weight") is None]
        if self.static and outside:
            raise LlmpressError(
                f"static activation scales are computed inside decoder layers; {outside[0]} is "
                "outside them: --ignore it"
            )
        self.plan, self.device = plan, options.device
        self.kv = KVCacheCalibration(plan.kv_cache) if plan.kv_cache is not None else None
        self.checkpoint_dtype = checkpoint_dtype(source, plan)
        dtype = compute_dtype(self.device, self.checkpoint_dtype, options.compute_dtype)
        self.stages = stages if stages is not None else stages_of(plan, False, None)
        self.caches = caches if caches is not None else [ActivationCache()]
        if len(self.caches) != len(self.stages):
            raise ValueError(f"{len(self.stages)} stages need as many caches")
        self.runner = LayerRunner(source, self.device, dtype=dtype, cache=self.caches[0])
        self.runner.capture(calibration.samples, hidden=not resumed)
        if not resumed:  # every stage starts from the embeddings' outputs
            for cache in self.caches[1:]:
                for i in range(len(self.runner.batches)):
                    cache.put(i, self.caches[0].get(i))
                cache.advance()
        self.offload_hessians = options.offload_hessians
        self.smoother = options.smoother  # the run's, where a stage smooths
        self.pruner = plan.sparsity.pruner if plan.sparsity is not None else None
        # What the algorithms see of the resident layer; the manifest's per-module results:
        # GPTQ's per module, smoothing's per site and layer.
        self.ctx = LayerContext(
            plan,
            options,
            self.runner,
            self.device,
            self.checkpoint_dtype,
            report={"gptq": {}, "smoothing": {}},
        )

    @property
    def report(self) -> dict[str, dict]:
        return self.ctx.report

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
        layout,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Layer `index`: observe its inputs, compress `weights` (by module name), run it
        compressed. `others`: the layer's remaining tensors (norms...), by full name. With
        several stages, each runs on its own hidden states, with the modules of the stages
        before it compressed and those of the stages after it still original."""
        read = {**others, **{f"{name}.weight": w for name, w in weights.items()}}
        layer = self.runner.load_layer(index, read)
        self.ctx.index = index
        if any(stage.smooths for stage in self.stages):
            self.smoother.prepare(self.ctx, weights)
        packed: dict[str, dict[str, torch.Tensor]] = {}
        held: list = []  # input quantizers of the modules earlier stages compressed
        with hooked(held):
            for k, stage in enumerate(self.stages):
                self.runner.cache = self.caches[k]
                last = k == len(self.stages) - 1
                done, readable = self._stage(index, layer, stage, weights, others, layout, last)
                if not last:  # the next stages run with these modules compressed
                    held += self._load_compressed(readable)
                packed |= done
        self.runner.unload_layer(index)
        return packed

    def _stage(
        self, index, layer, stage: Stage, weights, others, layout, last: bool
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
        needs = self.smoother.needs if stage.smooths else Need.NOTHING
        for name in part:
            if plan.quantized(name):
                needs |= quantizer_of(plan.method_of(name)).needs
        if pruned:
            needs |= self.pruner.needs
        kv = self.kv if last else None
        watch = None
        hooks = []
        if self.static or needs & (Need.HESSIAN | Need.CHANNELS | Need.INPUT_NORMS):
            watch = InputObserver(
                watched,
                needs | (Need.RANGES if self.static else Need.NOTHING),
                device=self.device,
                offload=self.offload_hessians,
                stop=not (stage.one_pass or stage.sequential),
            )
            hooks = [
                self.runner.modules[n].register_forward_pre_hook(watch.hook(n)) for n in watched
            ]
            if not stage.sequential:  # there the batches interleave: inputs known per layer
                hooks.append(layer.register_forward_pre_hook(watch.start))
        self.ctx.watch = watch
        if stage.sequential:  # observed, compressed and run in one pass (llmpress.sequential)
            with hooked(hooks):
                packed, readable = self._sequential(index, part, watch, layout)
        else:
            attentions = None
            if stage.one_pass and kv is not None:
                prefix = f"{self.runner.source.layer_prefix}.{index}."
                attentions = attention_modules(layer, prefix)
                hooks += kv.observe(attentions)
            if hooks:  # none: only the KV cache is calibrated, in the compressed passes below
                with hooked(hooks):
                    self.runner.forward_layer(index, update=stage.one_pass)
            elif stage.one_pass:
                self.runner.forward_layer(index)
            if stage.smooths:  # `weights` and `others` take the smoothed values
                self.smoother.apply(self.ctx, weights, others, stage.smooths)
            smoothed = {n: weights[n] for n in part}
            packed, states = self._compress_part(smoothed, layout)
            readable = self._decompressible(packed, states, layout)
        self._record_sparsity(pruned, readable)
        if stage.one_pass:
            if attentions is not None:
                packed.update(kv.scales(attentions, self.checkpoint_dtype))
        elif not stage.sequential:
            self._run_compressed(index, layer, packed, readable, kv)
        return packed, readable

    def _compress_part(self, weights, layout) -> tuple[dict, dict]:
        """Prune and quantize modules `weights` (by name) on what was observed of their
        inputs (`ctx.watch`): their stored tensors (packed) and their states, by module. By
        role: the pruner's masks first; then each group's quantizer, which either solves with
        the masks (pruned in its solve) or rounds weights the pruner pruned first, as
        llm-compressor's pruning modifier then its QuantizationModifier."""
        plan, pruner, ctx = self.plan, self.pruner, self.ctx
        pruned = {n: w for n, w in weights.items() if plan.pruned(n)}
        masks = pruner.masks(ctx, pruned) if pruned else {}
        states, packed = {}, {}
        for group, members in plan.by_group(weights):  # one group at a time
            scheme, quantizer = group.scheme, quantizer_of(group.method)
            mine = {m: weights[m] for m in members}
            first = {m: w for m, w in mine.items() if m in pruned}
            if first and not quantizer.solves:
                done = pruner.prune(ctx, first, masks)
                mine.update((m, done[m]["weight"].to(mine[m].dtype)) for m in first)
            solved = quantizer.quantize(ctx, mine, scheme, masks if quantizer.solves else {})
            states |= solved
            packed |= pack_states(solved, scheme, layout)
            if needs_calibration(scheme):
                for name in members:
                    packed[name].update(self._input_params(name, ctx.watch, weights[name].dtype))
        unquantized = {n: w for n, w in pruned.items() if not plan.quantized(n)}
        if unquantized:  # pruned only: stored dense, in the checkpoint's dtype
            for name, state in pruner.prune(ctx, unquantized, masks).items():
                states[name] = state
                packed[name] = {"weight": state["weight"].to(weights[name].dtype).cpu()}
        return packed, states

    def _sequential(self, index, part, watch, layout) -> tuple[dict, dict]:
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
            done, solved = self._compress_part({m: part[m] for m in members}, layout)
            packed.update(done)
            ready = self._decompressible(done, solved, layout)
            readable.update(ready)
            # The batches go on through these modules as they will be served.
            quantizers.extend(self._load_compressed(ready))
            return_freed_memory()  # the solve's temporaries, and the holes they leave
            return members

        sequencer = Sequencer({n: self.runner.modules[n] for n in part})
        with hooked(quantizers):
            self.runner.forward_layer_sequential(index, sequencer, compress)
        uncalled = {n: w for n, w in part.items() if n not in packed}
        if uncalled:  # modules no batch ran (GPTQ refuses them, as in two passes)
            done, solved = self._compress_part(uncalled, layout)
            packed.update(done)
            readable.update(self._decompressible(done, solved, layout))
        return packed, readable

    def _in_stage(self, name: str, stage: Stage, last: bool) -> bool:
        """Whether `stage` compresses module `name`: its group's stage; a module that is
        only pruned, the last stage's."""
        if self.plan.quantized(name):
            return self.plan.group_of(name).name in stage.quantizes
        return last

    def _record_sparsity(self, pruned: list[str], readable: dict) -> None:
        """Each pruned module's fraction of zeros as served, for the manifest."""
        report = self.report.setdefault("sparsity", {})
        for name in pruned:
            scheme = self.plan.scheme_of(name) if self.plan.quantized(name) else None
            report[name] = served_zeros(readable[name], scheme)

    def _input_params(
        self, name: str, ranges: InputObserver, dtype: torch.dtype
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
        quantizers: dict[int, InputQuantizer] = {}  # one per scheme's input arguments
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
                    id(scheme), InputQuantizer(scheme.input_activations)
                )
                params = {k: v for k, v in state.items() if k.startswith("input_")}
                hooks.append(module.register_forward_pre_hook(quantizer.hook(params)))
        return hooks

    def _run_compressed(self, index: int, layer, packed, readable, kv) -> None:
        """Run the layer as it will be served (dequantized weights, quantized inputs, and with
        --kv-cache its keys and values in fp8), so the next layer sees its real inputs."""
        hooks = self._load_compressed(readable)
        with hooked(hooks):
            if kv is not None:
                # What the compressed layer caches: observed, then stored in fp8 as the next
                # layer's inputs are computed.
                prefix = f"{self.runner.source.layer_prefix}.{index}."
                attentions = attention_modules(layer, prefix)
                with hooked(kv.observe(attentions)):
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
