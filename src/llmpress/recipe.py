"""Recipes: llm-compressor's YAML format (stages of modifiers) read into llmpress' options.

A recipe is a mapping of stages (`quant_stage:`), each a mapping of modifier lists
(`quant_modifiers:`), each a mapping of modifier names to their arguments, as llm-compressor
writes and reads them. Modifier names and keys are spelled as llm-compressor 0.14 spells them;
anything else is refused with the path of the bad key, so that a typo never runs silently
with a default. `checkpoint.recipe_yaml` writes what `read_recipe` reads back to the same
options.

Several config groups (or `scheme: {PRESET: [targets], ...}`) make a mixed-precision run, one
preset per group. A pruning modifier (SparseGPTModifier, WandaPruningModifier,
MagnitudePruningModifier) prunes alone, or before the quantization modifier in the same run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from pydantic import ValidationError

from llmpress.algorithms import DEFAULT_QUANTIZER, Role, by_modifier, by_role
from llmpress.algorithms.kvcache import kv_cache_args
from llmpress.errors import LlmpressError
from llmpress.schemes import build_scheme, scheme_names

log = logging.getLogger(__name__)

# The keys each modifier takes, and which of llmpress' options each one sets. None: read
# below (scheme, config_groups, kv_cache_scheme, actorder), or accepted with no effect here
# (NO_EFFECT: a warning says so).
_QUANT_KEYS = {
    "targets": "targets",
    "ignore": "ignore",
    "scheme": None,  # resolved to scheme/group_size/targets
    "config_groups": None,
    "kv_cache_scheme": None,
}
MODIFIER_KEYS: dict[str, dict[str, str | None]] = {
    "QuantizationModifier": dict(_QUANT_KEYS),
    "GPTQModifier": {
        **_QUANT_KEYS,
        "block_size": "block_size",
        "dampening_frac": "dampening_frac",
        "actorder": None,
        "offload_hessians": "offload_hessians",
        "sequential_update": None,  # llm-compressor's old flag: always sequential here
        "sequential_targets": None,  # llmpress runs decoder layers in sequence
    },
    "AWQModifier": {
        "duo_scaling": "duo_scaling",
        "n_grid": "awq_grid",
        "llmpress_clip": "awq_clip",
        "mappings": None,
        "ignore": None,  # the quantization modifier's ignore rules; sites onto ignored
        "targets": None,  # modules are skipped (llmpress.algorithms.smoothing)
        "scheme": None,
        "config_groups": None,
        "offload_device": None,
    },
    "SmoothQuantModifier": {
        "smoothing_strength": "smoothing_strength",
        "mappings": None,
        "ignore": None,
        "num_calibration_steps": None,
    },
}
# The pruning modifiers: what each key sets, as for the others. llm-compressor's magnitude
# modifier is a training-time schedule; in one shot its final sparsity is applied at once.
_PRUNE_KEYS = {
    "sparsity": "sparsity",
    "mask_structure": "mask",
    "targets": "sparsity_targets",
    "ignore": "sparsity_ignore",
    "sequential_targets": None,
    "sequential_update": None,
    "sparsity_profile": None,  # OWL: refused below
    "owl_m": None,
    "owl_lmbda": None,
}
MODIFIER_KEYS.update(
    SparseGPTModifier={
        **_PRUNE_KEYS,
        "block_size": "block_size",
        "dampening_frac": "dampening_frac",
        "offload_hessians": "offload_hessians",
        "preserve_sparsity_mask": None,  # refused below when true
    },
    WandaPruningModifier=dict(_PRUNE_KEYS),
    MagnitudePruningModifier={
        "targets": "sparsity_targets",
        "ignore": "sparsity_ignore",
        "final_sparsity": "sparsity",
        "mask_structure": "mask",
        "init_sparsity": None,
        "start": None,
        "end": None,
        "update": None,
        "update_scheduler": None,
        "scheduler_args": None,
        "leave_enabled": None,
        "apply_globally": None,  # refused below when true
    },
)
PRUNER_OF = {a.modifier: a.name for a in by_role(Role.PRUNE)}
# Accepted for llm-compressor's recipes, with no effect here: llmpress infers the smoothing
# mappings from the model, always runs decoder layers in sequence, and keeps its tensors where
# `--device` puts them.
NO_EFFECT = {"mappings", "sequential_update", "sequential_targets", "offload_device",
             "num_calibration_steps", "init_sparsity", "start", "end", "update",
             "update_scheduler", "scheduler_args", "leave_enabled"}  # fmt: skip
# Keys whose only supported value is off: what llmpress does not do, refused when asked for.
UNSUPPORTED = {
    "sparsity_profile": "OWL's outlier-weighted layer sparsities are not supported; give "
    "`sparsity` as a list, one per decoder layer",
    "owl_m": "OWL is not supported",
    "owl_lmbda": "OWL is not supported",
    "preserve_sparsity_mask": "llmpress prunes dense models; an existing mask is not kept",
    "apply_globally": "global magnitude pruning is not supported (llm-compressor neither)",
}
SPARSITY_MODIFIERS = tuple(PRUNER_OF)
QUANTIZERS = tuple(dict.fromkeys(a.modifier for a in by_role(Role.QUANTIZE)))


def read_recipe(recipe: str | os.PathLike | dict) -> dict[str, Any]:
    """A recipe (a YAML file, YAML text or an already parsed mapping) as keyword arguments of
    `compress_options`: scheme, targets, ignore, group_size, method and the method's options."""
    data = _load(recipe)
    modifiers = _modifiers(data)
    names = [name for name, _, _ in modifiers]
    for name, where, _ in modifiers:
        if name not in MODIFIER_KEYS:
            known = ", ".join(MODIFIER_KEYS)
            raise LlmpressError(f"{where}: unknown modifier {name!r}; known: {known}")
    quantizers = [m for m in modifiers if m[0] in QUANTIZERS]
    pruners = [m for m in modifiers if m[0] in SPARSITY_MODIFIERS]
    awq = next((a for n, _, a in modifiers if n == "AWQModifier"), None)
    awq_own = awq is not None and (awq.get("scheme") or awq.get("config_groups")) is not None
    if len(pruners) > 1:
        raise LlmpressError(
            f"a recipe takes one pruning modifier; this one has {len(pruners)}: "
            + ", ".join(n for n, _, _ in pruners)
        )
    if len(quantizers) > 1 or (not quantizers and not awq_own and not pruners):
        raise LlmpressError(
            "a recipe needs exactly one QuantizationModifier or GPTQModifier (the scheme), or "
            f"a pruning modifier; this one has {len(quantizers)}: "
            f"{', '.join(names) or 'no modifiers'}"
        )
    for name in ("AWQModifier", "SmoothQuantModifier"):
        if names.count(name) > 1:
            raise LlmpressError(f"a recipe takes one {name}; this one has {names.count(name)}")
    if "AWQModifier" in names and "SmoothQuantModifier" in names:
        raise LlmpressError("AWQModifier and SmoothQuantModifier cannot both smooth one scheme")

    fields: dict[str, Any] = {}
    for name, where, args in modifiers:
        allowed = MODIFIER_KEYS[name]
        for key in args:
            if key not in allowed:
                raise LlmpressError(
                    f"{where}.{key}: unknown key for {name}; it takes {', '.join(allowed)}"
                )
            if key in UNSUPPORTED and args[key] not in (None, False):
                raise LlmpressError(f"{where}.{key}: {UNSUPPORTED[key]}")
            if key in NO_EFFECT and args[key] is not None:
                log.warning("%s.%s: accepted, no effect in llmpress (%s)", where, key,
                            "mappings are inferred from the model" if key == "mappings"
                            else "layers run in sequence on --device")  # fmt: skip
        for key, option in allowed.items():
            if option is not None and key in args and args[key] is not None:
                value = args[key]
                if option in ("targets", "ignore", "sparsity_targets", "sparsity_ignore"):
                    value = _as_tuple(value)
                elif option == "sparsity" and isinstance(value, list):
                    value = tuple(value)
                if option in fields and fields[option] != value:
                    raise LlmpressError(
                        f"{where}.{key}: {value!r}, but another modifier gives {fields[option]!r}"
                        "; the two share one solve here: give the same value"
                    )
                fields[option] = value
    if pruners:
        fields["prune"] = PRUNER_OF[pruners[0][0]]
        if str(fields.get("mask", "")).strip() == "0:0":
            fields["mask"] = "unstructured"
        if not quantizers and not awq_own:
            return fields
    own = _scheme_fields("AWQModifier", awq) if awq_own else None
    if not quantizers:  # an AWQModifier with its own scheme quantizes (round to nearest)
        return _with_scheme(fields, own) | {"method": _named("AWQModifier")}
    name, where, args = quantizers[0]
    scheme = _scheme_fields(where, args)
    fields = _with_scheme(fields, scheme)
    if name == "GPTQModifier":
        fields["actorder"] = _actorder(args)
    if args.get("kv_cache_scheme") is not None:
        fields["kv_cache"] = _kv_cache(f"{where}.kv_cache_scheme", args["kv_cache_scheme"])
    if own is not None and own != scheme:
        # Several algorithms: AWQ then round to nearest on its groups, the quantization
        # modifier's method on the others (a module takes its most specific target's group).
        solver = by_modifier(name, Role.QUANTIZE).name
        groups = [{**g, "method": _named("AWQModifier")} for g in _groups(own)]
        groups += [{**g, "method": solver} for g in _groups(scheme)]
        for key in ("scheme", "targets", "group_size"):
            fields.pop(key, None)
        fields.update(groups=tuple(groups), method=solver)
        return fields
    fields["method"] = _method(names)
    return fields


def _with_scheme(fields: dict[str, Any], scheme: dict[str, Any]) -> dict[str, Any]:
    """`fields` with a modifier's scheme fields; with groups, each group has its targets and
    the modifier's (their union) are dropped."""
    fields = {**fields, **scheme}
    if "groups" in fields:
        fields.pop("targets", None)
    return fields


def _groups(fields: dict[str, Any]) -> list[dict[str, Any]]:
    """A modifier's scheme fields as a list of groups."""
    if "groups" in fields:
        return list(fields["groups"])
    group = {"scheme": fields["scheme"], "targets": fields.get("targets", ("Linear",))}
    if fields.get("group_size") is not None:
        group["group_size"] = fields["group_size"]
    return [group]


def _actorder(args: dict) -> str:
    """GPTQ's column order: the modifier's `actorder`, else the one its config group's weights
    name, else llm-compressor's default (static)."""
    if "actorder" in args:
        return "none" if args["actorder"] is None else str(args["actorder"])
    for group in (args.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict) and "actorder" in weights:
            return "none" if weights["actorder"] is None else str(weights["actorder"])
    return "static"


def _kv_cache(where: str, spelled: dict) -> str:
    """The `--kv-cache` choice whose arguments the recipe's kv_cache_scheme spells."""
    args = _validated(QuantizationArgs, where, spelled)
    for choice in ("fp8", "fp8-head"):
        if _comparable(kv_cache_args(choice)) == _comparable(args):
            return choice
    raise LlmpressError(
        f"{where}: llmpress quantizes the KV cache to fp8 with static scales per tensor (fp8) "
        "or per head (fp8-head); these arguments are neither"
    )


def _validated(model, where: str, data: dict):
    """compressed-tensors' own validation of `data`, its first error naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise LlmpressError(f"{where}.{key}: {first['msg']}") from None
    except NotImplementedError as exc:  # compressed-tensors' refusal of some arguments
        raise LlmpressError(f"{where}: {exc}") from None


def _load(recipe: str | os.PathLike | dict) -> dict:
    if isinstance(recipe, dict):
        return recipe
    text = str(recipe)
    path = Path(text).expanduser()
    if "\n" not in text and (path.suffix in (".yaml", ".yml") or path.exists()):
        if not path.is_file():
            raise LlmpressError(f"recipe {text} not found")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LlmpressError(f"the recipe is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise LlmpressError("a recipe is a mapping of stages (e.g. quant_stage: ...)")
    return data


def _modifiers(data: dict) -> list[tuple[str, str, dict]]:
    """(modifier name, where it sits as stage.group.name, its arguments), in recipe order."""
    found = []
    for stage, groups in data.items():
        if not str(stage).endswith("_stage") or not isinstance(groups, dict):
            raise LlmpressError(
                f"{stage}: a recipe's top level holds stages named *_stage, each a mapping of "
                "modifier groups (quant_stage: {quant_modifiers: {GPTQModifier: ...}})"
            )
        for group, modifiers in groups.items():
            if not str(group).endswith("_modifiers") or not isinstance(modifiers, dict):
                raise LlmpressError(
                    f"{stage}.{group}: a stage holds modifier groups named *_modifiers, each a "
                    "mapping of modifier names to their arguments"
                )
            for name, args in modifiers.items():
                where = f"{stage}.{group}.{name}"
                if args is None:
                    args = {}
                if not isinstance(args, dict):
                    raise LlmpressError(f"{where}: a modifier's arguments are a mapping")
                found.append((str(name), where, args))
    return found


def _named(modifier: str) -> str:
    """The name of the transform `modifier` stands for (AWQModifier: awq)."""
    return by_modifier(modifier, Role.TRANSFORM).name


def _method(names: list[str]) -> str:
    """The method of a recipe's modifiers: its smoother, then its quantizer (the last
    quantization modifier that solves, else round to nearest)."""
    quantizers = [q for n in names if (q := by_modifier(n, Role.QUANTIZE)) is not None]
    solver = next((q for q in quantizers if q.solves), DEFAULT_QUANTIZER)
    smoother = next((s for n in names if (s := by_modifier(n, Role.TRANSFORM)) is not None), None)
    if smoother is not None and smoother.quantizes_smoothed:
        if solver.solves:
            raise LlmpressError(f"{smoother.modifier} is followed by round to nearest: with a "
                                f"{solver.modifier}, give the {smoother.modifier} its own "
                                "scheme and targets (several algorithms in one run)")  # fmt: skip
        return smoother.name
    if smoother is not None:
        return f"{smoother.name}+{solver.name}" if solver.solves else smoother.name
    return solver.name


def _scheme_fields(where: str, args: dict) -> dict[str, Any]:
    """scheme, group_size and (from `scheme: {PRESET: [targets]}` or a config group) targets."""
    scheme, groups = args.get("scheme"), args.get("config_groups")
    if (scheme is None) == (groups is None):
        raise LlmpressError(
            f"{where}: give the scheme as `scheme` (a preset name, or {{PRESET: [targets]}}) "
            "or as `config_groups`, one of the two"
        )
    if isinstance(scheme, str):
        _preset(f"{where}.scheme", scheme)
        return {"scheme": scheme.upper()}
    if isinstance(scheme, dict):
        found = []
        for name, targets in scheme.items():
            _preset(f"{where}.scheme.{name}", str(name))
            found.append({"scheme": str(name).upper(), "targets": _as_tuple(targets)})
        return _one_or_groups(found)
    if scheme is not None:
        raise LlmpressError(f"{where}.scheme: a preset name or {{PRESET: [targets]}}")
    if not isinstance(groups, dict) or not groups:
        raise LlmpressError(f"{where}.config_groups: a mapping of group names to groups")
    found = [_spelled_out(f"{where}.config_groups.{name}", group) for name, group in groups.items()]
    return _one_or_groups(found)


def _one_or_groups(found: list[dict[str, Any]]) -> dict[str, Any]:
    """One group's fields as the run's scheme; several as mixed-precision groups, whose
    observer (an option of the run) must agree."""
    if len(found) == 1 and "args" not in found[0]:
        return found[0]
    observers = {g.pop("observer") for g in found if "observer" in g}
    if len(observers) > 1:
        raise LlmpressError(f"the groups' weight observers differ ({', '.join(observers)}); "
                            "llmpress runs one observer: give them one")  # fmt: skip
    fields: dict[str, Any] = {"groups": tuple(found)}
    if observers:
        fields["observer"] = observers.pop()
    return fields


def _spelled_out(where: str, group: dict) -> dict[str, Any]:
    """A config group spelled out: the preset (and group size) whose arguments it equals."""
    if not isinstance(group, dict) or "targets" not in group or "weights" not in group:
        raise LlmpressError(f"{where}: a config group needs targets and weights")
    scheme = _validated(QuantizationScheme, where, group)
    targets = tuple(scheme.targets)
    observer = scheme.weights.observer
    for name in scheme_names():
        for group_size in {None, scheme.weights.group_size}:
            try:
                preset = build_scheme(name, list(targets), group_size)
            except LlmpressError:
                continue
            if _same(preset, scheme):
                fields: dict[str, Any] = {"scheme": name, "targets": targets}
                if group_size is not None and group_size != preset_group_size(name):
                    fields["group_size"] = group_size
                if observer in ("minmax", "mse"):
                    fields["observer"] = observer
                return fields
    custom: dict[str, Any] = {
        "args": {k: v for k, v in group.items() if k != "targets"},
        "targets": targets,
    }
    if observer in ("minmax", "mse"):
        custom["observer"] = observer
    return custom


def preset_group_size(name: str) -> int | None:
    return build_scheme(name, ["Linear"]).weights.group_size


def _same(preset: QuantizationScheme, scheme: QuantizationScheme) -> bool:
    """The same quantization: weights, input and output activations' arguments, without the
    observer (an option here) and the activation order (GPTQ's `actorder` option)."""
    for field in ("weights", "input_activations", "output_activations"):
        a, b = getattr(preset, field), getattr(scheme, field)
        if (a is None) != (b is None):
            return False
        if a is not None and _comparable(a) != _comparable(b):
            return False
    return preset.format in (None, scheme.format) or scheme.format is None


def _comparable(args: QuantizationArgs) -> dict:
    return args.model_dump(exclude={"observer", "observer_kwargs", "actorder"})


def _preset(where: str, name: str) -> None:
    if name.upper() not in scheme_names():
        raise LlmpressError(
            f"{where}: unknown scheme {name!r}; choose one of {', '.join(scheme_names())}"
        )


def _as_tuple(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
