"""Flags from the settings dataclasses: each field declared with `setting(...)` (schemas.settings_fields)
becomes one flag in its --help group, its IMAGEGEN_* variable giving the flag's default; the parsed
arguments build the dataclasses back, nested ones (Limits, Topology) included."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Iterator

from schemas.settings_fields import FIELD_DEFAULT, Setting, comma_list, env_of, flag_of, spec_of, true_text


def settings_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Setting]]:
    """Every field of `cls` set from outside, the fields of its nested settings in their place."""
    for field in dataclasses.fields(cls):
        spec = spec_of(field)
        if spec is None:
            continue
        if spec.kind == "nested":
            yield from settings_fields(field.default_factory)
        else:
            yield field, spec


def dest_of(field: dataclasses.Field, spec: Setting) -> str:
    """The flag's name in the parsed arguments: the flag's own (--job-ttl: job_ttl), a repeatable one's the field's."""
    return field.name if spec.kind == "list" else flag_of(field).removeprefix("--").replace("-", "_")


def parse_of(field: dataclasses.Field, spec: Setting) -> Callable[[str], Any] | None:
    if spec.parse is not None:
        return message_as_argparse(spec.parse)
    kind = str(field.type)
    return int if kind.startswith("int") else float if kind.startswith("float") else None


def message_as_argparse(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parse whose ValueError reaches the user as its own words: "argument --fairness: 0 is less than 1"."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def flag_default(field: dataclasses.Field, spec: Setting, defaults: dict[str, Any]) -> Any:
    if field.name in defaults:
        return defaults[field.name]
    return field.default if spec.flag_default is FIELD_DEFAULT else spec.flag_default


def add_settings(group_of: Callable[[str], Any], parser: argparse.ArgumentParser, cls: type, defaults: dict[str, Any] | None = None) -> None:
    """A flag for each setting of `cls` not already on the parser (a shared one, --nats, comes once)."""
    for field, spec in settings_fields(cls):
        flag = flag_of(field)
        if spec.kind == "env" or flag in parser._option_string_actions:
            continue
        env = env_of(field)
        given = os.environ.get(env)
        default = flag_default(field, spec, defaults or {})
        options: dict[str, Any] = {"dest": dest_of(field, spec)}
        if spec.kind == "switch":
            options.update(action="store_true", default=true_text(given) if given is not None else default)
            note = f"{env}=1"
        elif spec.kind == "list":
            options.update(action="append", default=list(comma_list(given) if given is not None else default))
            note = f"{env}, comma-separated"
        else:
            options.update(default=given if given is not None else default, type=parse_of(field, spec))
            note = env
        if spec.choices:
            options["choices"] = list(spec.choices)
        if spec.metavar:
            options["metavar"] = spec.metavar
        group_of(spec.group).add_argument(flag, help=f"{spec.help} ({note})", **options)


def build_settings(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` from the parsed arguments; an absent optional flag leaves the field's default, and an empty
    or zero value of a field whose default is None (--default-timeout 0) is None."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        spec = spec_of(field)
        if spec is None or field.name in given:
            continue
        if spec.kind == "nested":
            values[field.name] = build_settings(field.default_factory, args)
            continue
        value = os.environ.get(env_of(field)) if spec.kind == "env" else getattr(args, dest_of(field, spec))
        if value is None:
            continue
        if field.default is None and not value:
            value = None
        elif isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return cls(**values, **given)
