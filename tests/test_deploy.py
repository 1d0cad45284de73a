"""deploy/ against the code: the Dockerfile, docker-compose.yml and k8s/ name the stream, consumers,
subjects, ports, CLI flags and IMAGEGEN_* variables the code really uses, and the k8s nats.conf forms
a 3-node JetStream cluster (run here on loopback) in which the topology is created with the deployed
replica count and KEDA's query finds every tier's consumer."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gpu_worker.engines.sdxl import SDXL_BASE
from imagegen.embedded_nats import free_port, nats_server_binary
from schemas import names
from schemas.connect import connect
from schemas.jetstream import Topology, ensure_topology
from tests.helpers.deploy_files import (
    COMPOSE,
    COMPOSE_DOC,
    CONTAINERS,
    Container,
    DEPLOY,
    DOCKERFILE,
    GATEWAY_PORT,
    HEALTH_PATH,
    IMAGE_NAME,
    JOB_STREAM,
    K8S,
    K8S_DOCS,
    NATS_CLIENT_PORT,
    NATS_CLUSTER_PORT,
    NATS_MONITOR_PORT,
    ROOT,
    TIER_CONSUMERS,
    compose_imagegen_services,
    configmap_data,
    container_port,
    containers,
    dockerfile_entrypoint,
    env_actions,
    k8s_deployment_of,
    k8s_manifests,
    known_env_names,
    load_yaml_docs,
    namespace,
    nats_statefulset,
    one,
    services_selecting,
    subcommands,
    value_from_env,
)


# ---- nats.conf ---------------------------------------------------------------------------------------


def nats_container() -> dict:
    (spec,) = nats_statefulset()["spec"]["template"]["spec"]["containers"]
    return spec


def nats_conf_path() -> str:
    args = nats_container()["args"]
    flag = next(a for a in ("--config", "-c") if a in args)
    return args[args.index(flag) + 1]


def nats_conf() -> str:
    path = nats_conf_path()
    directory, key = path.rsplit("/", 1)
    mounts = {m["mountPath"]: m["name"] for m in nats_container()["volumeMounts"]}
    volumes = {v["name"]: v for v in nats_statefulset()["spec"]["template"]["spec"]["volumes"]}
    assert directory in mounts, f"{path} is not in a mounted volume"
    configmap = volumes[mounts[directory]]["configMap"]["name"]
    return configmap_data(configmap)[key]


def conf_value(conf: str, key: str, *, block: str | None = None) -> str:
    if block is not None:
        match = re.search(rf"^{block}\s*\{{(.*?)^\}}", conf, re.M | re.S)
        assert match, f"nats.conf has no {block} block"
        conf = match.group(1)
        match = re.search(rf"^\s*{key}\s*[:=]\s*(\S+)", conf, re.M)
    else:
        match = re.search(rf"^{key}\s*[:=]\s*(\S+)", conf, re.M)
    assert match, f"nats.conf has no {key}" + (f" in {block}" if block else "")
    return match.group(1)


def conf_routes(conf: str) -> list[str]:
    match = re.search(r"routes\s*[:=]?\s*\[(.*?)\]", conf, re.S)
    assert match, "nats.conf names no cluster routes"
    return re.findall(r"nats(?:-route)?://[^\s,\]]+", match.group(1))


def store_mount() -> str:
    (claim,) = nats_statefulset()["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in nats_container()["volumeMounts"]}
    return mounts[claim["metadata"]["name"]]


# ---- files ------------------------------------------------------------------------------------------


def test_every_yaml_file_parses_into_named_resources():
    files = sorted(DEPLOY.rglob("*.y*ml"))
    assert COMPOSE in files and len(files) > 2
    for path in files:
        docs = load_yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path.name
    ns = namespace()
    for doc in K8S_DOCS:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc
        assert doc["metadata"].get("name"), doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == ns, f"{doc['kind']} {doc['metadata']['name']} is not in {ns}"


def test_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s_manifests())
    assert [i["name"] for i in kustomization.get("images", [])] == [IMAGE_NAME]


def test_dockerfile_installs_the_project_and_runs_its_command():
    text = DOCKERFILE.read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    assert dockerfile_entrypoint() == [IMAGE_NAME] and scripts[IMAGE_NAME] == "imagegen.cli:main"
    copied = {src for line in re.findall(r"^COPY\s+(.+)$", text, re.M) for src in line.split()[:-1]}
    for package in pyproject["tool"]["setuptools"]["packages"]:  # a sub-package comes with its top folder
        assert package.split(".")[0] in copied, f"the Dockerfile does not copy package {package}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    assert re.search(r"pip install\b.*\s\.(\s|$)", text), "the Dockerfile does not pip install the project"
    assert re.search(rf"^EXPOSE\s+{GATEWAY_PORT}\s*$", text, re.M)
    unknown = set(re.findall(r"\bIMAGEGEN_[A-Z0-9_]+", text)) - known_env_names()
    assert not unknown, f"the Dockerfile sets variables the CLI does not read: {unknown}"


def test_dockerfile_builds_a_slim_gateway_beside_the_gpu_worker():
    text = DOCKERFILE.read_text()
    stages = {m.group(2): m.group(1) for m in re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\w+)\s*$", text, re.M)}
    assert set(stages) == {"gateway", "worker"}, f"the Dockerfile's stages: {stages}"
    bodies = dict(zip(re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, re.M), re.split(r"^FROM\s.*$", text, flags=re.M)[1:]))
    slim = re.search(r"^ARG GATEWAY_BASE_IMAGE=(\S+)$", text, re.M)
    assert stages["gateway"] == "${GATEWAY_BASE_IMAGE}" and slim and re.fullmatch(r"python:3\.\d+-slim", slim.group(1))
    assert re.findall(r"pip install\b[^\n]*", bodies["gateway"]) == ["pip install . \\"], "the gateway installs more than the project"
    assert re.search(r"pip install\b.*'\.\[worker\]'", bodies["worker"]), "the worker image lacks the [worker] extra"
    targets = {name: svc["build"].get("target") for name, svc in compose_imagegen_services().items()}
    assert targets["gateway"] == "gateway" and targets["worker"] == "worker"


# ---- commands, flags and variables -------------------------------------------------------------------


def test_compose_and_k8s_run_gateways_and_workers():
    for platform in ("compose", "k8s"):
        assert containers(platform, "gateway"), f"{platform} runs no gateway"
        assert containers(platform, "worker"), f"{platform} runs no worker"


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_every_flag_is_one_the_subcommand_has(c: Container):
    subs = subcommands()
    assert c.command in subs, f"{c.where}: imagegen has no subcommand {c.command!r}"
    options = subs[c.command]._option_string_actions
    for token in c.argv[1:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in options, f"{c.where}: imagegen {c.command} has no flag {flag}"
    c.parse()


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_every_imagegen_variable_is_one_the_subcommand_reads(c: Container):
    actions = env_actions(subcommands()[c.command])
    args = c.parse()
    for name, value in c.env:
        if not name.startswith("IMAGEGEN_"):
            continue
        assert name in actions, f"{c.where}: imagegen {c.command} does not read {name}"
        action = actions[name]
        expected = value_from_env(action, value)
        flag = action.option_strings[0]
        assert getattr(args, action.dest) == expected, f"{c.where}: {name}={value} did not set {flag}"


@pytest.mark.parametrize("c", CONTAINERS, ids=lambda c: c.where)
def test_nats_url_is_the_nats_client_port_of_a_nats_service(c: Container):
    urls = c.parse().nats
    assert urls, f"{c.where}: no NATS URL (--nats or IMAGEGEN_NATS)"
    for url in urls.split(","):
        parts = urlsplit(url.strip())
        assert parts.scheme == "nats" and parts.port == NATS_CLIENT_PORT, f"{c.where}: {url}"
        host = parts.hostname.split(".")[0]
        if c.where.startswith("compose"):
            assert COMPOSE_DOC["services"][host]["image"].startswith("nats:"), f"{c.where}: {host} is not NATS"
            assert "nats" in c.spec["depends_on"], f"{c.where}: does not wait for NATS"
        else:
            service = one("Service", host)
            assert NATS_CLIENT_PORT in [p["port"] for p in service["spec"]["ports"]]
            assert service in services_selecting(nats_statefulset()), f"{c.where}: {host} does not select NATS"


def test_streams_are_replicated_as_many_times_as_there_are_nats_servers():
    nats_services = [s for s in COMPOSE_DOC["services"].values() if s["image"].startswith("nats:")]
    for c in CONTAINERS:
        servers = len(nats_services) if c.where.startswith("compose") else nats_statefulset()["spec"]["replicas"]
        assert c.parse().replicas == servers, f"{c.where}: --replicas must match the {servers} NATS server(s)"
    assert nats_statefulset()["spec"]["replicas"] == 3


# ---- gateway and workers ----------------------------------------------------------------------------


def gateway_routes() -> set[str]:
    return {r.resource.canonical for r in create_app(GatewaySettings()).router.routes()}


def test_compose_gateway_listens_on_the_published_port():
    (c,) = containers("compose", "gateway")
    args = c.parse()
    assert args.port == GATEWAY_PORT and args.host == "0.0.0.0"
    published = [str(p).split(":")[-1].split("/")[0] for p in c.spec["ports"]]
    assert str(GATEWAY_PORT) in published
    assert HEALTH_PATH in gateway_routes()
    assert f":{GATEWAY_PORT}{HEALTH_PATH}" in " ".join(c.spec["healthcheck"]["test"])


def test_k8s_gateways_are_ready_on_healthz_behind_a_service():
    (c,) = containers("k8s", "gateway")
    args = c.parse()
    assert args.port == GATEWAY_PORT and args.host == "0.0.0.0"
    deployment = k8s_deployment_of(c)
    assert deployment["spec"]["replicas"] >= 2
    probe = c.spec["readinessProbe"]["httpGet"]
    assert probe["path"] == HEALTH_PATH and HEALTH_PATH in gateway_routes()
    assert container_port(c.spec, probe["port"]) == GATEWAY_PORT
    (service,) = services_selecting(deployment)
    assert [container_port(c.spec, p["targetPort"]) for p in service["spec"]["ports"]] == [GATEWAY_PORT]


def test_compose_workers_take_one_distinct_nvidia_gpu_each():
    seen = []
    for c in containers("compose", "worker"):
        args = c.parse()
        assert args.device == "cuda:0" and args.model == SDXL_BASE, c.where
        (device,) = c.spec["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], c.where
        assert len(device["device_ids"]) == 1, c.where
        seen += device["device_ids"]
    assert len(seen) == len(set(seen)), f"two workers share a GPU: {seen}"


def test_k8s_workers_take_one_gpu_per_pod():
    for c in containers("k8s", "worker"):
        args = c.parse()
        assert args.device == "cuda:0" and args.model == SDXL_BASE, c.where
        assert int(c.spec["resources"]["limits"]["nvidia.com/gpu"]) == 1, c.where


# ---- the NATS cluster ---------------------------------------------------------------------------------


def test_compose_nats_runs_jetstream_on_a_volume():
    (svc,) = [s for s in COMPOSE_DOC["services"].values() if s["image"].startswith("nats:")]
    command = svc["command"]
    assert "-js" in command or "--jetstream" in command
    store = command[command.index("-sd") + 1]
    assert any(v.split(":")[1] == store and v.split(":")[0] in COMPOSE_DOC["volumes"] for v in svc["volumes"])
    assert command[command.index("-m") + 1] == str(NATS_MONITOR_PORT)
    assert f":{NATS_MONITOR_PORT}{HEALTH_PATH}" in " ".join(svc["healthcheck"]["test"])


def test_k8s_nats_config_routes_to_all_three_pods():
    sts, conf = nats_statefulset(), nats_conf()
    replicas, headless = sts["spec"]["replicas"], sts["spec"]["serviceName"]
    routes = [urlsplit(r) for r in conf_routes(conf)]
    assert len(routes) == replicas == 3
    expected = {f"{sts['metadata']['name']}-{i}.{headless}" for i in range(replicas)}
    assert {".".join(r.hostname.split(".")[:2]) for r in routes} == expected
    assert {r.port for r in routes} == {NATS_CLUSTER_PORT}
    assert conf_value(conf, "listen", block="cluster").endswith(f":{NATS_CLUSTER_PORT}")
    assert conf_value(conf, "listen").endswith(f":{NATS_CLIENT_PORT}")
    assert conf_value(conf, "http_port") == str(NATS_MONITOR_PORT)
    assert conf_value(conf, "store_dir", block="jetstream") == store_mount()
    env = {e["name"]: e for e in nats_container()["env"]}
    pod_name_var = conf_value(conf, "server_name").lstrip("$")
    assert env[pod_name_var]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {p["containerPort"] for p in nats_container()["ports"]}
    assert {NATS_CLIENT_PORT, NATS_CLUSTER_PORT, NATS_MONITOR_PORT} <= ports
    service = one("Service", headless)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert {NATS_CLUSTER_PORT, NATS_MONITOR_PORT} <= {p["port"] for p in service["spec"]["ports"]}


@pytest.mark.processes  # runs nats-server on the config
def test_k8s_nats_config_is_valid_for_nats_server(tmp_path):
    conf = tmp_path / "nats.conf"
    conf.write_text(nats_conf())
    pod_name_var = conf_value(nats_conf(), "server_name").lstrip("$")
    result = subprocess.run(
        [nats_server_binary(), "-c", str(conf), "-t"],
        env={**os.environ, pod_name_var: "nats-0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr + result.stdout


# ---- KEDA ---------------------------------------------------------------------------------------------


def keda_triggers() -> list[dict]:
    scaled = one("ScaledObject")
    return scaled["spec"]["triggers"]


def test_keda_scales_the_workers_on_every_tier_consumer():
    scaled = one("ScaledObject")
    (worker,) = containers("k8s", "worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == k8s_deployment_of(worker)["metadata"]["name"]
    triggers = keda_triggers()
    assert {t["type"] for t in triggers} == {"nats-jetstream"}
    assert sorted(t["metadata"]["consumer"] for t in triggers) == sorted(TIER_CONSUMERS)
    sts = nats_statefulset()
    for t in triggers:
        meta = t["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), f"KEDA takes only strings: {meta}"
        assert meta["stream"] == JOB_STREAM and meta["account"] == "$G"
        assert int(meta["lagThreshold"]) > 0
        host, port = meta["natsServerMonitoringEndpoint"].rsplit(":", 1)
        assert int(port) == NATS_MONITOR_PORT == int(conf_value(nats_conf(), "http_port"))
        service_name, ns = host.split(".")[:2]
        assert ns == namespace(), "KEDA runs in its own namespace: the endpoint must name ours"
        # KEDA asks each node by <server_name>.<endpoint host> in a cluster: server names are pod
        # names, which resolve under the StatefulSet's headless Service
        assert service_name == sts["spec"]["serviceName"]
        assert one("Service", service_name) in services_selecting(sts)


# ---- names --------------------------------------------------------------------------------------------


def known_subjects() -> set[str]:
    return {tier.subject for tier in names.TIERS} | {
        f"{names.EVENTS_SUBJECT_PREFIX}.>",
        f"{names.EVENTS_SUBJECT_PREFIX}.<job_id>",
        f"{names.JOBS_SUBJECT_PREFIX}.>",
        names.DLQ_SUBJECT,
        names.AUDIT_SUBJECT,
        names.CANCEL_SUBJECT,
    }


def test_names_in_deploy_are_the_names_the_code_uses():
    streams = {names.JOBS_STREAM, names.EVENTS_STREAM, names.DLQ_STREAM, names.AUDIT_STREAM}
    subjects = known_subjects()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        for word in re.findall(r"\bIMAGEGEN_[A-Z0-9_]+", text):
            assert word in streams | known_env_names(), f"{path.name}: {word} is neither a stream nor a variable"
        for subject in re.findall(r"(?<![\w.-])imagegen\.[a-z][\w.*>-]*(?:<job_id>)?", text):
            assert subject.rstrip(".") in subjects, f"{path.name}: unknown subject {subject}"
        for consumer in re.findall(r"\bimagegen-workers-[a-z]+\b", text):
            assert consumer in TIER_CONSUMERS, f"{path.name}: unknown consumer {consumer}"


# ---- the cluster, for real ----------------------------------------------------------------------------


@dataclass
class LocalNode:
    name: str
    client_port: int
    monitor_port: int
    process: subprocess.Popen
    log: Path


async def wait_healthy(session: aiohttp.ClientSession, node: LocalNode, deadline: float) -> None:
    url = f"http://127.0.0.1:{node.monitor_port}{HEALTH_PATH}"
    while True:
        assert node.process.poll() is None, f"{node.name} exited: {node.log.read_text()[-500:]}"
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, f"{node.name} did not become healthy"
        await asyncio.sleep(0.1)


@pytest.fixture
def local_cluster(tmp_path):
    """The StatefulSet's nats.conf on loopback: addresses and store moved, everything else as deployed."""
    sts, conf = nats_statefulset(), nats_conf()
    replicas = sts["spec"]["replicas"]
    pod_name_var = conf_value(conf, "server_name").lstrip("$")
    route_ports = [free_port() for _ in range(replicas)]
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in route_ports)
    nodes = []
    try:
        for i in range(replicas):
            name = f"{sts['metadata']['name']}-{i}"
            store = tmp_path / name
            node_conf = tmp_path / f"{name}.conf"
            node_conf.write_text(conf.replace(f"store_dir: {store_mount()}", f"store_dir: {store}"))
            client, monitor = free_port(), free_port()
            cmd = [nats_server_binary(), "-c", str(node_conf), "-a", "127.0.0.1", "-p", str(client)]
            cmd += ["-m", str(monitor), "--cluster", f"nats://127.0.0.1:{route_ports[i]}", "--routes", routes]
            cmd += ["-P", str(tmp_path / f"{name}.pid")]
            log = tmp_path / f"{name}.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(cmd, env={**os.environ, pod_name_var: name}, stdout=sink, stderr=sink)
            nodes.append(LocalNode(name, client, monitor, process, log))
        yield nodes
    finally:
        for node in nodes:
            node.process.terminate()
        for node in nodes:
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()


async def test_deployed_nats_config_holds_the_topology_with_three_replicas(local_cluster):
    (worker,) = containers("k8s", "worker")
    replicas = worker.parse().replicas
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        await asyncio.gather(*(wait_healthy(session, node, deadline) for node in local_cluster))
        servers = ",".join(f"nats://127.0.0.1:{n.client_port}" for n in local_cluster)
        nc = await connect(servers, name="test-deploy")
        try:
            js = nc.jetstream(timeout=5)
            while True:
                try:
                    await ensure_topology(js, Topology(replicas=replicas))
                    break
                except (NatsError, JetStreamError):
                    assert time.monotonic() < deadline, "the cluster never accepted the topology"
                    await asyncio.sleep(0.2)
            stream = await js.stream_info(JOB_STREAM)
            assert stream.config.num_replicas == replicas == len(local_cluster)
            assert 1 + len(stream.cluster.replicas) == len(local_cluster)
            for consumer in TIER_CONSUMERS:
                info = await js.consumer_info(JOB_STREAM, consumer)
                assert 1 + len(info.cluster.replicas) == len(local_cluster)
        finally:
            await nc.close()
        for trigger in keda_triggers():
            meta = trigger["metadata"]
            query = f"/jsz?acc={meta['account']}&consumers=true&config=true"  # what KEDA asks
            async with session.get(f"http://127.0.0.1:{local_cluster[0].monitor_port}{query}") as response:
                jsz = await response.json()
            assert jsz["meta_cluster"]["cluster_size"] == len(local_cluster)
            (account,) = [a for a in jsz["account_details"] if a["name"] == meta["account"]]
            (stream_detail,) = [s for s in account["stream_detail"] if s["name"] == meta["stream"]]
            leaders = {c["name"]: c["cluster"]["leader"] for c in stream_detail["consumer_detail"]}
            assert leaders.get(meta["consumer"]) in {n.name for n in local_cluster}
