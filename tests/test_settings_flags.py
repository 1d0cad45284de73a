"""One declaration per setting: every field of the gateway's and the worker's settings has one flag and
one IMAGEGEN_* variable, `imagegen up --help` shows each with its default, and the flags build the
settings back (read in-process from the parser the command uses)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from imagegen.cli import build_parser, gateway_settings, worker_settings
from imagegen.flags import settings_fields
from schemas.settings_fields import FIELD_DEFAULT, env_of, flag_of, spec_of

# Set by tests and benchmarks only: no flag on purpose. A new field goes here or gets `setting(...)`.
INTERNAL = {
    "GatewaySettings": {"nats_timeout_s", "cors_origins", "webhook_retry_s"},
    "WorkerSettings": {"heartbeat_s", "progress_write_s", "gpu_temp_poll_s", "sim_step_s_per_mpx", "sim_fixed_s", "sim_refiner_step_factor", "sim_refiner_fixed_s"},
    "Limits": {"max_side", "min_side"},
    "Topology": {"events_ttl_s", "duplicate_window_s", "worker_ttl_s", "audit_ttl_s"},
}
ENV_ONLY = {"api_keys"}  # a secret: the variable only (named in --api-keys' help)


def all_classes(cls: type) -> list[type]:
    nested = [f.default_factory for f in dataclasses.fields(cls) if spec_of(f) and spec_of(f).kind == "nested"]
    return [cls, *(c for n in nested for c in all_classes(n))]


def up_parser(monkeypatch) -> argparse.ArgumentParser:
    for name in [n for n in __import__("os").environ if n.startswith("IMAGEGEN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "400")
    (sub,) = [a for a in build_parser("up")._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["up"]


@pytest.mark.parametrize("cls", [GatewaySettings, WorkerSettings])
def test_every_field_is_a_setting_with_one_flag_and_one_variable_or_is_named_internal(cls):
    for part in all_classes(cls):
        unset = {f.name for f in dataclasses.fields(part) if spec_of(f) is None}
        assert unset == INTERNAL[part.__name__], f"{part.__name__}: give these setting(...) or list them as internal: {unset ^ INTERNAL[part.__name__]}"
    flags, envs = {}, {}
    for field, spec in settings_fields(cls):
        assert spec.help, f"{field.name} has no help"
        if spec.kind != "env":
            flags.setdefault(flag_of(field), []).append(field.name)
        envs.setdefault(env_of(field), []).append(field.name)
    assert all(len(names) == 1 for names in flags.values()), flags
    assert all(len(names) == 1 for names in envs.values()), envs


def test_up_help_shows_each_setting_once_with_its_default_and_variable(monkeypatch):
    up = up_parser(monkeypatch)
    raw = up.format_help()
    text = " ".join(raw.split())
    declared = {}
    for cls in (GatewaySettings, WorkerSettings):
        for field, spec in settings_fields(cls):
            if spec.kind == "env":
                assert field.name in ENV_ONLY and env_of(field) in text
                continue
            if flag_of(field) in declared:  # shared by both parts (--nats, the limits): declared alike
                assert declared[flag_of(field)] == (field.name, spec), flag_of(field)
                continue
            declared[flag_of(field)] = (field.name, spec)
            action = up._option_string_actions[flag_of(field)]
            assert [line.split()[0] for line in raw.splitlines() if line.startswith("  -")].count(flag_of(field)) == 1, flag_of(field)
            assert env_of(field) in (action.help or ""), flag_of(field)
            default = field.default if spec.flag_default is FIELD_DEFAULT else spec.flag_default
            if field.name == "data_dir":  # the command's default is the data folder, not the settings' ""
                default = action.default
            assert action.default == (list(default) if spec.kind == "list" else default), flag_of(field)
            if default not in (None, False, "", ()):
                assert f"(default: {default}; {env_of(field)}" in text, flag_of(field)


def test_the_flags_build_the_settings_their_defaults_give(monkeypatch):
    up = up_parser(monkeypatch)
    args = up.parse_args([])
    built = dataclasses.replace(worker_settings(args, "nats://127.0.0.1:1"), worker_id="w", data_dir="")
    assert built == WorkerSettings(nats_url="nats://127.0.0.1:1", worker_id="w")
    assert gateway_settings(args, "nats://127.0.0.1:1") == GatewaySettings(nats_url="nats://127.0.0.1:1")


def test_a_variable_and_a_flag_reach_the_setting_and_nested_one(monkeypatch):
    monkeypatch.setenv("IMAGEGEN_JOB_TTL", "90.5")
    monkeypatch.setenv("IMAGEGEN_BLOCKLIST", "a, b")
    monkeypatch.setenv("IMAGEGEN_LORAS", "x=one,y=two")
    monkeypatch.setenv("IMAGEGEN_REDACT_PROMPTS", "1")
    monkeypatch.setenv("IMAGEGEN_API_KEYS", "[]")
    args = build_parser("up").parse_args(["up", "--max-steps", "7", "--default-timeout", "0", "--lora", "z=three"])
    gateway, worker = gateway_settings(args, "nats://127.0.0.1:1"), worker_settings(args, "nats://127.0.0.1:1")
    assert gateway.topology.job_ttl_s == worker.topology.job_ttl_s == 90.5
    assert gateway.limits.max_steps == worker.limits.max_steps == 7
    assert gateway.blocklist == ("a", "b") and gateway.redact_prompts and gateway.api_keys == "[]"
    assert gateway.default_timeout_s is None
    assert worker.loras == ("x=one", "y=two", "z=three")


def test_the_engine_settings_extend_the_workers_engine_options_instead_of_copying_them():
    from gpu_worker.engines.options import EngineOptions
    from gpu_worker.engines.sdxl import SdxlSettings

    options = {f.name for f in dataclasses.fields(EngineOptions)}
    assert issubclass(SdxlSettings, EngineOptions) and issubclass(WorkerSettings, EngineOptions)
    shared = {f.name for f in dataclasses.fields(SdxlSettings)} & {f.name for f in dataclasses.fields(WorkerSettings)}
    assert shared == options | {"model", "device"}  # those two the worker resolves (auto) before the engine loads
    assert {"--lora", "--dtype", "--compile", "--max-batch"} <= {flag_of(f) for f in dataclasses.fields(EngineOptions)}
