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

This module is over 450 lines because one class holds one layer's whole calibrated pass: the
smoothing and the solve read and write the same resident layer, observer and report.
"""

from __future__ import annotations

import logging

import torch
from compressed_tensors.quantization import (
    QuantizationScheme,
    QuantizationStrategy,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from llmpress.activations import ActivationCache
from llmpress.algorithms import Need, pruner_named, quantizer_of, smoother_of
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
from llmpress.observation import InputObserver
from llmpress.packing import installed_layout, layouts_differ
from llmpress.plan import Plan, fused_groups
from llmpress.quantize import check_finite, global_scales, layer_states, pack_states
from llmpress.runner import LayerRunner
from llmpress.sequential import Sequencer
from llmpress.served import InputQuantizer, dequantized_weight, hooked, served_zeros
from llmpress.source import ModelSource
from llmpress.stages import Stage, checkpoint_dtype, compute_dtype, needs_calibration, stages_of

log = logging.getLogger(__name__)

# Modules AWQ's clipping search leaves alone: queries and keys.
CLIP_SKIPPED = ("q_proj", "k_proj", "qkv_proj")


class CalibratedLayers:
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
        with hooked(held):
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
            watch = InputObserver(
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
            with hooked(hooks):
                packed, readable = self._sequential(index, part, watch, observer, layout)
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
        with hooked(quantizers):
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
        self, index, layer, stage: Stage, weights, others, watch: InputObserver, observer
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

    def _clip(self, weights, watch: InputObserver, observer) -> None:
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
