"""`llmpress compress`'s flags, built from the one table of options (llmpress.config's
CompressOptions: name, default, help, CLI spelling), and the parsing of the flags whose text is
not their value (sizes, lists of fractions)."""

from __future__ import annotations

import re
import types

import click


class _MethodChoice(click.Choice):
    """--method's choices, read from the algorithm registry each time they are needed: an
    algorithm registered after this module is imported (a plugin's) is offered too."""

    def __init__(self):
        super().__init__([])

    @property
    def choices(self) -> tuple[str, ...]:
        from llmpress.algorithms import method_choices

        return tuple(method_choices())

    @choices.setter
    def choices(self, value) -> None:  # noqa: ANN001 - click's __init__ sets them
        pass


def _size(text: str) -> int:
    """'2GB', '500MB', '1GiB' or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise click.BadParameter(f"{text!r} is not a size such as 2GB or 500MB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {
        "": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "KI": 1024,
        "MI": 1024**2,
        "GI": 1024**3,
        "TI": 1024**4,
    }
    return int(number * scale[unit])


class TableCommand(click.Command):
    """A command whose options come from the table of options (llmpress.config), each a flag
    as its `cli` entry says, with its help text and default from there: defined once, for the
    CLI and the API. They are built when the command first parses or shows help, so that
    importing the CLI (and `llmpress --help`, `llmpress schemes`) stays free of torch."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not getattr(self, "_table_added", False):
            self.params.extend(_table_params())
            self._table_added = True
        return super().get_params(ctx)


def _table_params() -> list[click.Option]:
    from llmpress.lazy_compile import deferred_torch_compile

    with deferred_torch_compile():  # the table imports compressed-tensors (lazy_compile)
        from llmpress.config import CompressOptions

    params = []
    for name, field in CompressOptions.model_fields.items():
        spec = (field.json_schema_extra or {}).get("cli")
        if spec is None:
            continue
        flag = spec.get("flag") or "--" + name.replace("_", "-")
        kwargs: dict = {"default": None, "help": _help(field)}
        choices = _choices(field.annotation)
        if spec.get("parse") == "method":
            kwargs["type"] = _MethodChoice()
        elif "flag" in spec:  # "--x/--no-x" is a switch by its spelling
            if "/" not in flag:
                kwargs["is_flag"] = True
        elif spec.get("multiple"):
            kwargs["multiple"] = True
        elif choices:
            kwargs["type"] = click.Choice(choices)
        elif not spec.get("parse"):
            kwargs["type"] = _scalar(field.annotation)
        params.append(click.Option([flag, name], **kwargs))
    return params


def _help(field) -> str:  # noqa: ANN001 - a pydantic FieldInfo
    default = field.default
    if default is None or default == () or default is False:
        return field.description
    if isinstance(default, tuple):
        default = ", ".join(default)
    elif default is True:
        default = "on"
    elif isinstance(default, int) and default >= 1024**2 and default % 1024**2 == 0:
        default = f"{default // 1024**3}GiB" if default % 1024**3 == 0 else f"{default}B"
    return f"{field.description} Default: {default}."


def _choices(annotation) -> list[str] | None:  # noqa: ANN001
    """The values of a Literal (or Literal | None) annotation."""
    from typing import Literal, Union, get_args, get_origin

    if get_origin(annotation) is Literal:
        return [str(v) for v in get_args(annotation)]
    if get_origin(annotation) in (Union, types.UnionType):
        for part in get_args(annotation):
            if get_origin(part) is Literal:
                return [str(v) for v in get_args(part)]
    return None


def _scalar(annotation):  # noqa: ANN001, ANN202
    """int, float or str, from an annotation that may add `| None`."""
    from typing import get_args

    for kind in (int, float):
        if annotation is kind or kind in get_args(annotation):
            return kind
    return str


def _table_values(table: dict) -> dict:
    """The table's flags as CompressOptions' values: None where not given."""
    values = {}
    for name, value in table.items():
        if isinstance(value, tuple):
            value = value or None
        elif name == "max_shard_size" and value is not None:
            value = _size(value)
        elif name == "sparsity":
            value = _sparsity(value)
        values[name] = value
    return values


def _sparsity(text: str | None) -> float | list[float] | None:
    """--sparsity: one fraction, or a comma-separated list of them."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: a fraction, or fractions separated by commas"
        ) from None
    return values[0] if len(values) == 1 else values
