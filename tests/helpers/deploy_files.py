"""deploy/ as data for the tests: the k8s manifests and docker-compose.yml parsed, the names the code
uses (stream, consumers, ports, image), and every imagegen container they run, with its argv and
environment, parsed by the CLI's own parser."""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from gateway.settings import GatewaySettings
from imagegen.cli import build_parser
from schemas import names
from schemas.jetstream import Topology, consumer_config, job_stream_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

GATEWAY_PORT = GatewaySettings().port
NATS_CLIENT_PORT = urlsplit(GatewaySettings().nats_url).port
NATS_CLUSTER_PORT = 6222  # nats-server's route port
NATS_MONITOR_PORT = 8222  # nats-server's HTTP monitoring port, which KEDA queries
JOB_STREAM = job_stream_config(Topology()).name
TIER_CONSUMERS = {consumer_config(Topology(), tier).durable_name for tier in names.TIERS}
HEALTH_PATH = "/healthz"
POD_VALUE = "set-from-the-pod"  # stands in for an env value the pod supplies (fieldRef)
IMAGE_NAME = "imagegen"


# ---- loading ---------------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


K8S_DOCS: list[dict] = [doc for path in k8s_manifests() for doc in load_yaml_docs(path)]
COMPOSE_DOC: dict = yaml.safe_load(COMPOSE.read_text())


def k8s(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in K8S_DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(kind: str, name: str | None = None) -> dict:
    found = k8s(kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def nats_statefulset() -> dict:
    return one("StatefulSet", "nats")


def namespace() -> str:
    return one("Namespace")["metadata"]["name"]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def services_selecting(workload: dict) -> list[dict]:
    labels = pod_labels(workload)
    return [s for s in k8s("Service") if s["spec"].get("selector") and s["spec"]["selector"].items() <= labels.items()]


def container_port(container: dict, port) -> int:
    """A probe's or Service's port, which may name one of the container's ports."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in named, f"port {port!r} is not a port of container {container['name']}"
    return named[port]


def configmap_data(name: str) -> dict:
    return one("ConfigMap", name)["data"]


# ---- the CLI ---------------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def env_actions(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """IMAGEGEN_* variable -> the flag it sets, as the CLI's help states it."""
    out = {}
    for action in sub._actions:
        for name in re.findall(r"\bIMAGEGEN_[A-Z0-9_]+", action.help or ""):
            out[name] = action
    return out


def value_from_env(action: argparse.Action, value: str):
    """What a flag becomes when its variable is set to `value`."""
    if isinstance(action, argparse._StoreTrueAction):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(action, argparse._AppendAction):
        return [item.strip() for item in value.split(",") if item.strip()]
    return action.type(value) if action.type else value


def known_env_names() -> set[str]:
    return {name for sub in subcommands().values() for name in env_actions(sub)}


@dataclass(frozen=True)
class Container:
    where: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    spec: dict

    @property
    def command(self) -> str:
        return self.argv[0]

    def parse(self) -> argparse.Namespace:
        saved = {k: v for k, v in os.environ.items() if k.startswith("IMAGEGEN_")}
        try:
            for k in saved:
                del os.environ[k]
            os.environ.update(dict(self.env))
            try:
                return build_parser().parse_args(list(self.argv))
            except SystemExit as exc:
                raise AssertionError(f"{self.where}: imagegen {' '.join(self.argv)} does not parse") from exc
        finally:
            for k in [k for k in os.environ if k.startswith("IMAGEGEN_")]:
                del os.environ[k]
            os.environ.update(saved)


def dockerfile_entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.M)
    assert match, "deploy/Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(match.group(1))


def compose_imagegen_services() -> dict[str, dict]:
    return {
        name: svc
        for name, svc in COMPOSE_DOC["services"].items()
        if svc.get("image", "").split(":")[0] == IMAGE_NAME
    }


def compose_containers() -> list[Container]:
    out = []
    for name, svc in compose_imagegen_services().items():
        entrypoint = svc.get("entrypoint", dockerfile_entrypoint())
        assert entrypoint == [IMAGE_NAME], f"compose {name}: entrypoint {entrypoint}"
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        out.append(Container(f"compose {name}", tuple(svc["command"]), tuple(env.items()), svc))
    return out


def k8s_env(spec: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        env.update({k: str(v) for k, v in configmap_data(source["configMapRef"]["name"]).items()})
    for item in spec.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else POD_VALUE
    return env


def k8s_containers() -> list[Container]:
    out = []
    for deployment in k8s("Deployment"):
        for spec in deployment["spec"]["template"]["spec"]["containers"]:
            if spec["image"].split(":")[0] != IMAGE_NAME:
                continue
            argv = list(spec.get("command", dockerfile_entrypoint())) + list(spec.get("args", []))
            assert argv[0] == IMAGE_NAME, f"k8s {deployment['metadata']['name']}: runs {argv[0]}, not {IMAGE_NAME}"
            env = k8s_env(spec)
            out.append(Container(f"k8s {deployment['metadata']['name']}", tuple(argv[1:]), tuple(env.items()), spec))
    return out


CONTAINERS = compose_containers() + k8s_containers()


def containers(platform: str, command: str) -> list[Container]:
    return [c for c in CONTAINERS if c.where.startswith(platform) and c.command == command]


def k8s_deployment_of(c: Container) -> dict:
    return one("Deployment", c.where.split(" ", 1)[1])
