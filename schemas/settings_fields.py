"""One declaration per setting: a settings dataclass field that also names its flag, help, environment
variable and --help group, so the command line is generated from the dataclasses (imagegen.cli).

    port: int = setting(4030, help="gateway port", group="network")

gives `--port` (the field's name, dashed, without its unit suffix `_s`) and IMAGEGEN_PORT (the flag's
name, upper-case). A field without `setting(...)` is internal: tests and benchmarks set it, no flag does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

KEY = "imagegen_setting"
GROUPS = ("network", "limits", "engine", "safety", "operations", "testing")  # --help lists them in this order
UNIT_SUFFIXES = ("_s",)  # dropped from the flag: job_ttl_s is --job-ttl
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
FIELD_DEFAULT = "<the field's default>"  # Setting.flag_default when it is the field's own


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setting:
    """How a field is set from outside. `parse` turns the flag's (or variable's) text into the value and
    raises ValueError naming what is wrong; `kind` is value, switch (a flag without a value, the variable
    1/true/yes/on), list (a repeatable flag, the variable comma-separated), env (the variable only, no
    flag: a secret) or nested (a dataclass whose own fields are settings)."""

    help: str = ""
    group: str = "operations"
    flag: str | None = None  # default: from the field's name
    env: str | None = None  # default: from the flag; without IMAGEGEN_
    parse: Callable[[str], Any] | None = None  # default: int or float after the field's default, else text
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    kind: str = "value"
    flag_default: Any = FIELD_DEFAULT  # what --help shows and an absent flag gives, when not the field's default
    dest: str | None = None  # the flag's own name in the parsed arguments, for a repeatable one (--lora: loras)


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with its default and how it is set (see Setting)."""
    spec = Setting(**meta)
    if spec.group not in GROUPS:
        raise ValueError(f"setting group {spec.group!r} is not one of {', '.join(GROUPS)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={KEY: spec})


def nested(factory: Any) -> Any:
    """A field holding another settings dataclass (Limits, Topology) whose fields are settings themselves."""
    return dataclasses.field(default_factory=factory, metadata={KEY: Setting(kind="nested")})


def nats_url_setting() -> Any:
    """The broker's address, shared by the gateway's and the worker's settings (one --nats for `imagegen up`)."""
    return setting(DEFAULT_NATS_URL, flag="--nats", env="NATS", group="network", flag_default=None, help="NATS server URL(s), comma-separated")


def spec_of(field: dataclasses.Field) -> Setting | None:
    return field.metadata.get(KEY)


def flag_of(field: dataclasses.Field) -> str:
    spec = spec_of(field)
    if spec and spec.flag:
        return spec.flag
    name = field.name
    for suffix in UNIT_SUFFIXES:
        name = name.removesuffix(suffix)
    return "--" + name.replace("_", "-")


def env_of(field: dataclasses.Field) -> str:
    spec = spec_of(field)
    return "IMAGEGEN_" + ((spec and spec.env) or flag_of(field).removeprefix("--").replace("-", "_").upper())


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is less than 1")
    return value


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def true_text(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")
