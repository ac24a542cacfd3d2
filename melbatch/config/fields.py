"""What every config is made of: :func:`flag` (a field with its help, which becomes a ``--flag``),
:class:`ConfigError` (a message that says what to change), and loading from YAML and flags:
:func:`parse_yaml`, :func:`build` (a dataclass from a dict, unknown keys refused by name),
:func:`nested` (sections, and flat keys from before a section existed), :func:`merge` (defaults <
YAML < flags)."""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import field, fields
from typing import Any

import yaml

Seconds = float

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which one and what to change."""


def flag(default: Any, help: str) -> Any:
    """A field the command line sets: ``melbatch.cli.options`` makes its ``--flag`` (typed and defaulted from
    the field) with this help, so a field and its documentation live together. Fields without it
    (URIs given as arguments, nested configs) get no flag."""
    return field(default=default, metadata={"help": help})


def inside(child: str, parent: str) -> bool:
    """Whether URI ``child`` lies strictly under ``parent`` (local paths made absolute, ``file://`` dropped)."""
    def spelled(u: str) -> str:
        u = u.removeprefix("file://")
        return (u if "://" in u else os.path.abspath(u)).rstrip("/") + "/"
    return spelled(child).startswith(spelled(parent)) and spelled(child) != spelled(parent)


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Construct dataclass ``cls`` from a plain dict (its sections as dicts too), rejecting unknown keys
    by name."""
    if not isinstance(values, dict):
        raise ConfigError(f"'{where}' must be a section of settings (name: value lines), not {_kind(values)}")
    names = {f.name for f in fields(cls)}
    values = nested(cls, values, where)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} in '{where}'; known: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    numbers(cls, values, where)
    try:
        return cls(**values)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"in '{where}': {e}") from None


def _kind(value: Any) -> str:
    return {list: "a list", tuple: "a list", str: "text", bool: "true/false", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__) + f" ({value!r})"[:60]


def numbers(cls: type, values: dict[str, Any], where: str) -> None:
    """Fields typed ``int`` or ``float`` take numbers, never booleans (YAML's ``n_mels: true`` is 1 to
    Python); an ``int`` field takes no fraction. Raises naming the setting and what it should be."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        want = hints.get(name)
        if value is None or want not in (int, float, int | None, float | None):
            continue
        whole = want in (int, int | None)
        if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
            raise ConfigError(f"{where}.{name} is {_kind(value)}: give {'a whole number' if whole else 'a number'}")


def parse_yaml(text: str | bytes, where: str) -> dict[str, Any]:
    """A YAML config's text (read from ``where``, named in errors) as a dict of sections; empty gives ``{}``."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {where} must hold a mapping with sections like 'features:' and 'featurize:'")
    return data


def sections(cls: type) -> dict[str, type]:
    """The fields of ``cls`` that are sections of their own with defaults (``TrainConfig.augment``)."""
    return {f.name: f.default_factory for f in fields(cls)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}


def nested(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with the keys of ``cls``'s sections under their section. A key written flat, as
    before the section existed (``train: {noise_prob: 0.5}``), still loads, with one line saying the
    new place (``train: {augment: {noise_prob: 0.5}}``)."""
    own = {f.name for f in fields(cls)}
    for name, sub in sections(cls).items():
        if values.get(name) is not None and not isinstance(values[name], dict | sub):
            raise ConfigError(f"'{where}.{name}' must be a section of settings (name: value lines), not "
                              f"{_kind(values[name])}")
        flat = {k: values[k] for k in values if k not in own and k in {f.name for f in fields(sub)}}
        if flat:
            print(f"melbatch: {where}: {', '.join(flat)}: these settings live in its '{name}:' section now "
                  f"({where}.{name}.{next(iter(flat))}); the flat keys still load", file=sys.stderr)
            values = {**{k: v for k, v in values.items() if k not in flat},
                      name: {**flat, **(values.get(name) or {})}}
        if isinstance(values.get(name), dict):
            values = {**values, name: build(sub, values[name], f"{where}.{name}")}
    return values


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; ``None`` values in a layer mean "not given" and are skipped."""
    out: dict[str, Any] = {}
    for layer in layers:
        out.update({k: v for k, v in layer.items() if v is not None})
    return out
