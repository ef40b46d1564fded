"""Command-line options generated from a pydantic model, so each setting is declared once.

A field's type, default and ``description`` become the flag, its default shown in the help, and
its help text; ``json_schema_extra={"flags": (...)}`` overrides the flag names (see
``config.flag``). Every generated option defaults to ``None`` meaning "not given", so the
model's own precedence (flag > env > file > default) decides, not typer.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, Optional, Union

import typer
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def flags_of(name: str, info: FieldInfo) -> tuple[str, ...]:
    """A settings field's command-line flags: its declared ``flags``, else ``--name``."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return tuple(extra.get("flags") or (f"--{name.replace('_', '-')}",))  # type: ignore[arg-type]


def _default_text(name: str, info: FieldInfo, env: bool) -> str:
    """``default X; env DEPOIS_NAME`` (parts that do not apply left out), or ""."""
    parts = []
    if info.default is PydanticUndefined and info.default_factory is None:
        parts.append("required")
    else:
        default = info.default if info.default_factory is None else info.default_factory()
        if isinstance(default, bool):
            parts.append(f"default {'on' if default else 'off'}")
        elif default not in (None, {}, []):
            parts.append(f"default {default}")
    if env:
        parts.append(f"env DEPOIS_{name.upper()}")
    return f" ({'; '.join(parts)})" if parts else ""


def parameters(model: type[BaseModel], skip: Iterable[str] = (),
               env: bool = True) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of ``model``: dict fields are repeatable
    KEY=VALUE pairs, list fields repeatable options; ``env`` says the settings are also
    ``DEPOIS_<NAME>`` environment variables (shown in the help)."""
    out = []
    skipped = set(skip)
    for name, info in model.model_fields.items():
        if name in skipped:
            continue
        kind = _unwrap_optional(info.annotation)
        help_text = f"{info.description}{_default_text(name, info, env)}"
        if typing.get_origin(kind) is Literal:
            choices = "|".join(str(a) for a in typing.get_args(kind))
            annotation: Any = Optional[str]
            help_text = f"{help_text} One of {choices}."
        elif typing.get_origin(kind) is dict or kind is dict:
            annotation = Optional[list[str]]
        elif typing.get_origin(kind) is list and typing.get_args(kind)[0] in (int, float, str):
            annotation = Optional[list[typing.get_args(kind)[0]]]
        elif kind in (int, float, bool, str, Path):
            annotation = Optional[kind]
        else:  # pragma: no cover - a new field type needs a rule here
            raise TypeError(f"no command-line rule for {name}: {info.annotation}")
        option = typer.Option(None, *flags_of(name, info), help=help_text, show_default=False)
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                     annotation=annotation))
    return out


def parse_pairs(name: str, pairs: list[str] | None) -> dict[str, Any] | None:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (values read as YAML scalars)."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expects KEY=VALUE (e.g. security_protocol=SASL_SSL), "
                                     f"got {pair!r}", param_hint=f"--{name}")
        out[key.strip()] = yaml.safe_load(value)  # "9" -> 9, "true" -> True, text stays text
    return out


def option(name: str, annotation: Any, default: Any, *flags: str, help: str) -> inspect.Parameter:
    """One hand-written option for ``command(extra=...)``."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *flags, help=help))


def reflow(doc: str) -> str:
    """Docstring paragraphs as single lines: rich's help keeps every source line break."""
    return "\n\n".join(" ".join(p.split()) for p in doc.split("\n\n"))


def command(fn: Callable[..., Any], model: type[BaseModel], skip: Iterable[str] = (),
            extra: Iterable[inspect.Parameter] = (), env: bool = True) -> Callable[..., Any]:
    """``fn(**settings)`` with a signature typer reads: ``extra`` then the model's options."""
    params = [*extra, *parameters(model, skip, env)]

    def wrapper(**kwargs: Any) -> Any:
        return fn(**kwargs)

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__doc__ = reflow(inspect.getdoc(fn) or "")
    wrapper.__name__ = fn.__name__
    return wrapper
