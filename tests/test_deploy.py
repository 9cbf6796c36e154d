"""Deployment files: they parse, validate, and agree with SPEC.md and the relay's real output.

Nothing here builds an image or talks to a cluster (no Docker engine, no network): the files
are checked statically, the relay's configuration loader reads each deployment's environment,
and the metric names the alerts and the dashboard query are looked up in ``/metrics`` scraped
from a relay that has just relayed a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import shlex
import signal
import socket
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay.config import load_config
from relay.metrics import TERMINALS
from tests.conftest import SSE, FakeUpstream, RelayFactory, read_all, step

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
# The contract as this repository carries it (test_contract.py keeps it equal to shared/).
SPEC = Path(__file__).resolve().parents[1] / "docs" / "SPEC.md"

CONTAINER_TMP = "/tmp"  # noqa: S108 (the container's tmpfs, not a temporary file here)
PUBLIC_PORT = 8080
ADMIN_PORT = 9091
RELAY_IMAGE = "wavespeed-relay"  # compose's local tag and the k8s image name kustomize rewrites
# Kubernetes versions the manifests must validate against: an old supported one and the newest.
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# Not relay settings, but legitimately in the relay's environment.
EXTRA_ENV = {"PROMETHEUS_MULTIPROC_DIR"}
DOCKERFILE_EXTRA_ENV = {
    "PATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
}
# Series Prometheus itself makes, which the relay never exports.
PROMETHEUS_SERIES = {"up"}


# --- reading the files -------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def load_yaml(path: Path) -> Any:
    (doc,) = load_yaml_docs(path)
    return doc


def spec_text() -> str:
    assert SPEC.is_file(), f"the product contract is missing: {SPEC}"
    return SPEC.read_text(encoding="utf-8")


def spec_env_names() -> set[str]:
    return set(re.findall(r"`((?:RELAY|WAVESPEED)_[A-Z0-9_]+)`", spec_text()))


def spec_metrics() -> dict[str, set[str]]:
    """SPEC's metric table: series name as written (``relay_bytes_total``) -> label names."""
    metrics = {}
    for row in re.findall(r"^\| `(relay_\w+)` \|[^|]*\|([^|]*)\|", spec_text(), re.M):
        name, labels = row
        labels = re.sub(r"\([^)]*\)", "", labels.split("—")[0])
        metrics[name] = set(re.findall(r"`(\w+)`", labels))
    return metrics


def spec_outcomes() -> set[str]:
    (line,) = re.findall(r"^`outcome` is one of (.*)$", spec_text(), re.M)
    return set(re.findall(r"`(\w+)`", line))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    return instructions


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV (the last stage's, as the container sees it)."""
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            env = {}
        elif keyword == "ENV":
            for item in shlex.split(args):
                name, sep, value = item.partition("=")
                assert sep, f"use ENV NAME=value, not the legacy form: {args!r}"
                env[name] = value
    return env


def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "docker-compose.yml")


def compose_relays() -> dict[str, dict[str, Any]]:
    """The compose services that run the relay itself (not the mock or the monitoring)."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image", "").startswith(RELAY_IMAGE)
        and "mock-upstream" not in service.get("command", [])
    }


def kustomization_files(directory: Path) -> Iterator[Path]:
    """Every file a kustomization (or component) in ``directory`` uses, recursively."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    yield directory / "kustomization.yaml"
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        path = directory / entry
        yield from kustomization_files(path) if path.is_dir() else [path]
    for patch in kustomization.get("patches", []):
        yield directory / patch["path"]


def k8s_resources(directory: Path = K8S) -> list[dict[str, Any]]:
    """The resources of a kustomization (no patches), as written."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += k8s_resources(path) if path.is_dir() else load_yaml_docs(path)
    return resources


def k8s_all_resources() -> list[dict[str, Any]]:
    """The base's resources and the Redis component's, every one a complete manifest."""
    return k8s_resources() + k8s_resources(K8S / "redis")


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        r
        for r in k8s_resources()
        if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def relay_container() -> dict[str, Any]:
    (container,) = [
        c
        for c in k8s_one("Deployment")["spec"]["template"]["spec"]["containers"]
        if c["image"] == RELAY_IMAGE
    ]
    return container


def cloudrun() -> dict[str, Any]:
    return load_yaml(DEPLOY / "cloudrun" / "service.yaml")


def cloudrun_env() -> dict[str, str]:
    (container,) = cloudrun()["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def fly() -> dict[str, Any]:
    return tomllib.loads((DEPLOY / "fly.toml").read_text(encoding="utf-8"))


def k8s_env() -> dict[str, str]:
    container = relay_container()
    env = {}
    for source in container.get("envFrom", []):
        env |= k8s_one("ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", [])}
    return env


def deployment_envs() -> dict[str, dict[str, str]]:
    """Each deployment's relay environment as the process sees it: image ENV, then the file's."""
    image = dockerfile_env()
    envs = {f"compose:{name}": image | s["environment"] for name, s in compose_relays().items()}
    envs["k8s"] = image | k8s_env()
    envs["cloudrun"] = image | cloudrun_env()
    envs["fly"] = image | fly()["env"]
    return envs


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"]
        for rule in g["rules"]
    ]


def dashboard() -> dict[str, Any]:
    return json.loads(
        (DEPLOY / "grafana" / "dashboards" / "relay.json").read_text(encoding="utf-8")
    )


def dashboard_queries() -> list[str]:
    board = dashboard()
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


# --- parsing ------------------------------------------------------------------------------


def test_every_deploy_file_parses() -> None:
    """Every YAML, TOML and JSON file under deploy/ parses, and the expected ones exist."""
    parsed = {}
    for path in sorted(DEPLOY.rglob("*")):
        if path.suffix in (".yml", ".yaml"):
            parsed[path] = load_yaml_docs(path)
        elif path.suffix == ".toml":
            parsed[path] = tomllib.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".json":
            parsed[path] = json.loads(path.read_text(encoding="utf-8"))
    expected = {
        "docker-compose.yml",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yml",
        "grafana/dashboards/relay.json",
        "grafana/provisioning/datasources/prometheus.yml",
        "grafana/provisioning/dashboards/relay.yml",
        "k8s/kustomization.yaml",
        "k8s/redis/kustomization.yaml",
        "cloudrun/service.yaml",
        "fly.toml",
    }
    assert expected <= {str(p.relative_to(DEPLOY)) for p in parsed}
    assert all(parsed.values()), "an empty deployment file"


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    """Every built-in resource, base and Redis component, validates strictly (unknown fields fail)."""
    checked = set()
    for resource in k8s_all_resources():
        if resource["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema here; test_servicemonitor_scrapes_the_admin_port checks it
        kubernetes_validate.validate(resource, version, strict=True)
        checked.add(resource["kind"])
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    } <= checked


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """The strict validation has teeth: a typo in the Deployment fails it."""
    deployment = copy.deepcopy(k8s_one("Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 75
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_every_k8s_file_is_part_of_a_kustomization() -> None:
    """No manifest under deploy/k8s is left out of kustomize, and every listed file exists."""
    used = set(kustomization_files(K8S)) | set(kustomization_files(K8S / "redis"))
    assert all(path.is_file() for path in used)
    assert set(K8S.rglob("*.yaml")) == used


def test_deployment_is_locked_down() -> None:
    """The relay pod runs non-root on a read-only root with no capabilities, /tmp an emptyDir."""
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    container = relay_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # A Service named "relay" would inject RELAY_PORT=tcp://... into the environment.
    assert pod["enableServiceLinks"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts[CONTAINER_TMP]["name"]]
    assert dockerfile_env()["PROMETHEUS_MULTIPROC_DIR"].startswith(CONTAINER_TMP + "/")
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]


def test_deployment_probes_hit_health_on_the_admin_port() -> None:
    """Liveness asks /healthz and readiness /readyz, both on the admin port 9091."""
    container = relay_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PUBLIC_PORT, "admin": ADMIN_PORT}

    def target(probe: str) -> tuple[str, int]:
        get = container[probe]["httpGet"]
        port = get["port"]
        return get["path"], ports[port] if isinstance(port, str) else port

    assert target("livenessProbe") == ("/healthz", ADMIN_PORT)
    assert target("readinessProbe") == ("/readyz", ADMIN_PORT)
    assert target("startupProbe") == ("/healthz", ADMIN_PORT)


def test_termination_grace_outlasts_prestop_and_the_drain() -> None:
    """terminationGracePeriodSeconds exceeds the preStop sleep plus RELAY_SHUTDOWN_GRACE."""
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    command = relay_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(k8s_env()["RELAY_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain


def test_secret_files_come_from_the_mounted_secret() -> None:
    """Every *_FILE setting points into the Secret's mount, at a key the example Secret has."""
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    (secret_volume,) = [v for v in pod["volumes"] if "secret" in v]
    (mount,) = [m for m in relay_container()["volumeMounts"] if m["name"] == secret_volume["name"]]
    assert mount["readOnly"] is True
    secret = k8s_one("Secret", secret_volume["secret"]["secretName"])
    paths = {item["path"]: item["key"] for item in secret_volume["secret"]["items"]}
    files = {k: v for k, v in k8s_env().items() if k.endswith("_FILE")}
    assert {"WAVESPEED_API_KEY_FILE", "RELAY_TOKEN_SECRET_FILE"} <= set(files)
    for value in files.values():
        directory, _, name = value.rpartition("/")
        assert directory == mount["mountPath"]
        assert paths[name] in secret["stringData"]
    assert "WAVESPEED_API_KEY" not in k8s_env(), "the key must come from a file"


def test_example_secret_is_clearly_fake() -> None:
    """The example Secret carries placeholders that say so, never something key-shaped."""
    for value in k8s_one("Secret")["stringData"].values():
        assert "EXAMPLE" in value
        assert "NOT-A-REAL" in value


def test_browser_facing_config_uses_tokens_and_an_origin_list() -> None:
    """Production config on Kubernetes turns on token auth and names the allowed origins."""
    env = k8s_env()
    assert env["RELAY_CLIENT_AUTH"] == "token"
    assert env["RELAY_ALLOWED_ORIGINS"].startswith("https://")
    assert "RELAY_ALLOW_ANONYMOUS" not in env


def test_services_expose_public_and_admin_ports_separately() -> None:
    """The public Service carries only 8080; the admin port is on its own Service."""
    pod_labels = k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in k8s_resources() if s["kind"] == "Service"}
    public = services["wavespeed-relay"]
    admin = services["wavespeed-relay-admin"]
    assert [p["port"] for p in public["spec"]["ports"]] == [PUBLIC_PORT]
    assert [p["port"] for p in admin["spec"]["ports"]] == [ADMIN_PORT]
    for service in (public, admin):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_hpa_and_pdb_target_the_relay() -> None:
    """The autoscaler scales the Deployment and the disruption budget selects its pods."""
    deployment = k8s_one("Deployment")
    hpa = k8s_one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    selector = k8s_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_network_policy_keeps_the_admin_port_to_monitoring() -> None:
    """Ingress to 9091 comes only from the monitoring namespace; egress is DNS and 443 only."""
    policy = k8s_one("NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    by_port: dict[int, list[Any]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {PUBLIC_PORT, ADMIN_PORT}
    assert by_port[ADMIN_PORT] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 443}


def test_servicemonitor_scrapes_the_admin_port() -> None:
    """The ServiceMonitor (a CRD, checked by hand) selects the admin Service's 9091 /metrics."""
    monitor = k8s_one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = [
        s
        for s in k8s_resources()
        if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()
    ]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert ports[endpoint["port"]] == ADMIN_PORT
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])
    # The alerts select job="wavespeed-relay".
    assert {"targetLabel": "job", "replacement": "wavespeed-relay"} in endpoint["relabelings"]


# --- container, compose, edge ---------------------------------------------------------------


def test_dockerfile_builds_a_slim_non_root_image() -> None:
    """Multi-stage from slim Python 3.11, non-root user, `relay serve`, key from a secret file."""
    instructions = dockerfile_instructions()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(stages) >= 2
    assert all(" AS " in stage.upper() for stage in stages)
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    users = [a for k, a in instructions if k == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid, so runAsNonRoot can check it"
    assert int(uid) != 0
    assert json.loads(dict(instructions)["CMD"]) == ["relay", "serve"]
    env = dockerfile_env()
    assert env["RELAY_HOST"] == "0.0.0.0"
    assert env["WAVESPEED_API_KEY_FILE"] == "/run/secrets/wavespeed_api_key"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == CONTAINER_TMP + "/relay-metrics"
    exposed = {int(p) for k, a in instructions if k == "EXPOSE" for p in a.split()}
    assert exposed == {PUBLIC_PORT, ADMIN_PORT}
    assert "curl" not in dict(instructions)["HEALTHCHECK"]
    runtime = [i for i, (k, _) in enumerate(instructions) if k == "FROM"][-1]
    build = instructions[:runtime]
    assert any(k == "RUN" and "gcc" in a for k, a in build), "relay._speedups needs a compiler"


def test_dockerignore_admits_exactly_what_the_dockerfile_copies() -> None:
    """.dockerignore denies everything but the sources the build stage copies."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            copied |= {source.rstrip("/") for source in shlex.split(args)[:-1]}
    assert copied == allowed
    assert all((REPO / source).exists() for source in copied)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_healthcheck(port: int) -> int:
    healthcheck = dict(dockerfile_instructions())["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert command[:2] == ["python", "-c"]
    env = {**os.environ, "RELAY_ADMIN_PORT": str(port)}
    process = await asyncio.create_subprocess_exec(sys.executable, *command[1:], env=env)
    return await step(process.wait())


async def test_healthcheck_command_tells_a_live_relay_from_a_dead_one(
    upstream: FakeUpstream, make_relay: RelayFactory
) -> None:
    """The image's HEALTHCHECK command exits 0 against a relay's /healthz and non-zero without one."""
    relay = await make_relay()
    assert await run_healthcheck(relay.client.port) == 0
    assert await run_healthcheck(free_port()) != 0


def image_command() -> list[str]:
    """ENTRYPOINT followed by CMD, as the container runtime runs them."""
    instructions = dict(dockerfile_instructions())
    return [*json.loads(instructions["ENTRYPOINT"]), *json.loads(instructions["CMD"])]


async def test_image_entrypoint_runs_the_relay_on_an_empty_tmp(tmp_path: Path) -> None:
    """The image's ENTRYPOINT, CMD and ENV start `relay serve` on a fresh /tmp; SIGTERM exits 0."""
    key_file = tmp_path / "wavespeed_api_key"
    key_file.write_text("fake-key-for-the-entrypoint-test\n")
    metrics_dir = tmp_path / "tmpfs" / "relay-metrics"  # /tmp/relay-metrics, not yet there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "WAVESPEED_"))}
    env |= dockerfile_env() | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RELAY_HOST": "127.0.0.1",  # the image's 0.0.0.0, kept to loopback in a test
        "RELAY_PORT": "0",
        "RELAY_ADMIN_PORT": "0",
        "WAVESPEED_API_KEY_FILE": str(key_file),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    process = await asyncio.create_subprocess_exec(
        *image_command(),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        started: dict[str, Any] = {}
        while started.get("event") != "relay_started":
            line = await step(process.stdout.readline())
            assert line, "the relay exited before it started"
            with contextlib.suppress(ValueError):
                started = json.loads(line)
        async with aiohttp.ClientSession() as session:
            async with session.get(started["url"] + "/not-relayed") as response:
                assert response.status == 404  # counted: a metric value now exists
            for path in ("/healthz", "/readyz", "/metrics"):
                async with session.get(started["admin_url"] + path) as response:
                    assert response.status == 200, path
        assert list(metrics_dir.glob("*.db")), "metrics did not go to PROMETHEUS_MULTIPROC_DIR"
        process.send_signal(signal.SIGTERM)
        assert await step(process.wait()) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_compose_relays_are_locked_down_and_publish_only_the_public_port() -> None:
    """Compose relays run read-only with a /tmp tmpfs and publish 8080 on loopback, never 9091."""
    relays = compose_relays()
    assert set(relays) == {"relay", "relay-mock"}
    for service in relays.values():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["read_only"] is True
        assert service["tmpfs"] == [CONTAINER_TMP]
        assert service["cap_drop"] == ["ALL"]
        assert service["ports"] == [f"127.0.0.1:{PUBLIC_PORT}:{PUBLIC_PORT}"]
    for name, service in compose()["services"].items():
        published = " ".join(service.get("ports", []))
        assert str(ADMIN_PORT) not in published, f"{name} publishes the admin port"
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", []))


def test_compose_mock_profile_points_the_relay_at_the_mock_upstream() -> None:
    """Profile mock runs `relay mock-upstream` and a relay whose upstream is that service."""
    services = compose()["services"]
    mock = services["mock-upstream"]
    assert mock["profiles"] == ["mock"]
    assert mock["command"] == ["relay", "mock-upstream", "--host", "0.0.0.0", "--port", "8090"]
    relay = services["relay-mock"]
    assert relay["profiles"] == ["mock"]
    assert relay["environment"]["RELAY_UPSTREAM_URL"] == "http://mock-upstream:8090"
    assert "mock-upstream" in relay["depends_on"]
    # Prometheus scrapes "relay": the mock-profile relay answers to that name too.
    assert "relay" in relay["networks"]["default"]["aliases"]
    live = services["relay"]
    assert live["profiles"] == ["live"]
    (secret,) = live["secrets"]
    assert f"/run/secrets/{secret}" == dockerfile_env()["WAVESPEED_API_KEY_FILE"]


def test_compose_wires_prometheus_and_grafana() -> None:
    """Prometheus loads the alert rules and scrapes relay:9091; Grafana gets datasource and dashboard."""
    services = compose()["services"]
    mounts = {
        v.split(":")[1]: DEPLOY / v.split(":")[0]
        for s in ("prometheus", "grafana")
        for v in services[s]["volumes"]
        if v.startswith("./")
    }
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert config_path == DEPLOY / "prometheus" / "prometheus.yml"
    config = load_yaml(config_path)
    for rule_file in config["rule_files"]:
        assert mounts[f"/etc/prometheus/{rule_file}"] == DEPLOY / "prometheus" / rule_file
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "wavespeed-relay"  # the alerts select job="wavespeed-relay"
    assert job["static_configs"][0]["targets"] == [f"relay:{ADMIN_PORT}"]

    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(provisioning / "dashboards" / "relay.yml")["providers"]
    assert (mounts[provider["options"]["path"]] / "relay.json").is_file()


def test_edge_configs_fit_the_platform_limits() -> None:
    """Cloud Run and Fly set the relay's timeouts and drain under the platforms' own limits."""
    run = cloudrun()
    assert run["apiVersion"] == "serving.knative.dev/v1"
    spec = run["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [PUBLIC_PORT]
    assert container["ports"][0]["name"] == "http1"
    assert spec["timeoutSeconds"] <= 3600
    env = cloudrun_env()
    assert float(env["RELAY_MAX_STREAM_SECONDS"]) < spec["timeoutSeconds"]
    assert float(env["RELAY_SHUTDOWN_GRACE"]) < 10  # SIGKILL follows SIGTERM after 10 s
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"

    app = fly()
    assert app["http_service"]["internal_port"] == PUBLIC_PORT
    assert app["metrics"]["port"] == ADMIN_PORT
    assert float(app["env"]["RELAY_IDLE_TIMEOUT"]) < 60  # Fly's proxy idle timeout
    assert app["kill_timeout"] > float(app["env"]["RELAY_SHUTDOWN_GRACE"])
    assert app["http_service"]["concurrency"]["type"] == "connections"


# --- every deployment's environment against SPEC and the relay's own loader ----------------


@pytest.mark.parametrize("source", sorted(deployment_envs()))
def test_environment_names_are_in_spec(source: str) -> None:
    """Every variable a deployment gives the relay is a SPEC name (or a known runtime extra)."""
    names = set(deployment_envs()[source])
    unknown = names - spec_env_names() - EXTRA_ENV - DOCKERFILE_EXTRA_ENV
    assert not unknown, f"{source} sets variables SPEC.md does not name: {sorted(unknown)}"
    assert not (names & DOCKERFILE_EXTRA_ENV) - set(dockerfile_env())


def test_only_relay_services_get_relay_variables() -> None:
    """No compose service other than the relay is handed RELAY_* or WAVESPEED_* settings."""
    relays = compose_relays()
    for name, service in compose()["services"].items():
        if name not in relays:
            env = service.get("environment", {})
            assert not [k for k in env if k.startswith(("RELAY_", "WAVESPEED_"))], name


@pytest.mark.parametrize("source", sorted(deployment_envs()))
def test_deployment_environment_is_accepted_by_the_relay(source: str, tmp_path: Path) -> None:
    """The relay's own loader accepts each deployment's environment, with ports 8080 and 9091."""
    env = dict(deployment_envs()[source])
    for name, value in env.items():
        if name.endswith("_FILE") and value:  # stand-ins for the mounted secret files
            path = tmp_path / name.lower()
            path.write_text("fake-secret-" + "x" * 48 + "\n")
            env[name] = str(path)
    if source == "fly":  # `fly secrets set` puts these in the environment
        env["WAVESPEED_API_KEY"] = "fake-key-from-fly-secrets"
        env["RELAY_TOKEN_SECRET"] = "fake-token-secret-from-fly-secrets-" + "x" * 32
    config = load_config(None, env)
    assert (config.port, config.admin_port) == (PUBLIC_PORT, ADMIN_PORT)
    assert config.host == "0.0.0.0"
    assert config.api_key.startswith("fake-") or source == "compose:relay-mock"


def test_shutdown_windows_exceed_the_drain_grace() -> None:
    """Compose, Kubernetes and Fly wait longer than RELAY_SHUTDOWN_GRACE before killing."""
    for service in compose_relays().values():
        grace = float(service["environment"]["RELAY_SHUTDOWN_GRACE"])
        assert float(service["stop_grace_period"].removesuffix("s")) > grace
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(k8s_env()["RELAY_SHUTDOWN_GRACE"])
    assert fly()["kill_timeout"] > float(fly()["env"]["RELAY_SHUTDOWN_GRACE"])


# --- alerts and dashboard against the relay's real /metrics ----------------------------------

SERIES = re.compile(r"(?<![\w:$\"])(relay_[A-Za-z0-9_:]*|up)\b\s*(\{[^}]*\})?")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
LABEL_VALUES = re.compile(r"label_values\(\s*(relay_\w+)\s*,\s*(\w+)\s*\)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def queried(expressions: list[str]) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(series name, {label: (operator, value)}) for every selector in the expressions."""
    found = []
    for expression in expressions:
        assert expression.count("(") == expression.count(")"), expression
        for name, braces in SERIES.findall(expression):
            matchers = {label: (op, value) for label, op, value in MATCHER.findall(braces)}
            found.append((name, matchers))
        for name, label in LABEL_VALUES.findall(expression):
            found.append((name, {label: ("=~", ".*")}))
    return found


async def scrape_after_a_stream(upstream: FakeUpstream, make_relay: RelayFactory) -> str:
    """/metrics text after one relayed SSE stream and one rejected request."""
    relay = await make_relay(port=PUBLIC_PORT, admin_port=PUBLIC_PORT)  # one listener, /metrics too
    feed = upstream.stream(SSE)
    response = await step(relay.client.post("/api/v3/wavespeed-ai/any-llm/stream", data=b"{}"))
    assert response.status == 200
    events = [b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n', b"data: [DONE]\n\n"]
    for event in events:
        feed.send(event)
        assert await step(response.content.readexactly(len(event))) == event
    feed.end()
    assert await read_all(response) == b""
    rejected = await step(relay.client.post("/api/v3/not/allowed/stream", data=b"{}"))
    assert rejected.status == 403
    await rejected.release()
    scraped = await step(relay.client.get("/metrics"))
    assert scraped.status == 200
    return await step(scraped.text())


class Exposition:
    """What a scrape exports: families with their types, series names and label names."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            if family.type == "gauge" and family.name.endswith("_created"):
                continue  # the _created companion of a counter or histogram
            self.types[family.name] = family.type
            self.labels[family.name] = {k for s in family.samples for k in s.labels} - {"le"}
        # Families with no samples yet show no labels; SPEC's table names them.
        for name, labels in spec_metrics().items():
            family = name if name in self.types else self.family_of(name)
            if family is not None:
                self.labels[family] |= labels

    def family_of(self, series: str) -> str | None:
        for family, kind in self.types.items():
            if any(series == family + suffix for suffix in SUFFIXES[kind]):
                return family
        return None


@pytest.fixture
async def exposition(upstream: FakeUpstream, make_relay: RelayFactory) -> Exposition:
    return Exposition(await scrape_after_a_stream(upstream, make_relay))


async def test_relay_exports_every_spec_metric(exposition: Exposition) -> None:
    """The scrape the checks below rely on holds every SPEC metric family and the SSE ones."""
    for name in spec_metrics():
        assert exposition.family_of(name) or name in exposition.types, f"{name} is not in /metrics"
    for name in ("relay_sse_events_total", "relay_stream_terminals_total"):
        assert exposition.family_of(name), f"{name} is not in /metrics"


def known_values() -> dict[str, set[str]]:
    direction = re.search(r"`direction` \(([^)]*)\)", spec_text())
    assert direction is not None
    return {
        "outcome": spec_outcomes(),
        "direction": set(re.findall(r"`(\w+)`", direction.group(1))),
        "terminal": set(TERMINALS),
        "job": {"wavespeed-relay"},
    }


def check_queries(expressions: list[str], exposition: Exposition) -> set[str]:
    """Assert every selector names a real series with real labels; return the families used."""
    families = set()
    all_labels = set().union(*exposition.labels.values()) | {"le", "instance", "job"}
    for name, matchers in queried(expressions):
        if name in PROMETHEUS_SERIES:
            continue
        family = exposition.family_of(name)
        assert family is not None, f"{name} is not a series the relay exports"
        families.add(family)
        for label, (op, value) in matchers.items():
            assert label in exposition.labels[family], f"{name} has no label {label!r}"
            if op in ("=", "!=") and label in known_values():
                assert value in known_values()[label], f"{label}={value!r} never occurs"
    for expression in expressions:
        for grouping in GROUPING.findall(expression):
            labels = {label.strip() for label in grouping.split(",")}
            assert labels <= all_labels, f"grouping by unknown labels {labels - all_labels}"
    return families


async def test_alert_rules_query_only_real_metrics(exposition: Exposition) -> None:
    """Every metric and label in alerts.yml exists in the relay's /metrics output."""
    families = check_queries([rule["expr"] for rule in alert_rules()], exposition)
    assert {
        "relay_streams",
        "relay_time_to_first_byte_seconds",
        "relay_chunk_forward_seconds",
        "relay_active_streams",
        "relay_stream_terminals",
    } <= families


async def test_dashboard_queries_only_real_metrics(exposition: Exposition) -> None:
    """Every metric and label the Grafana dashboard queries exists in the relay's /metrics."""
    families = check_queries(dashboard_queries(), exposition)
    assert {
        "relay_active_streams",
        "relay_time_to_first_byte_seconds",
        "relay_chunk_forward_seconds",
        "relay_bytes",
        "relay_streams",
        "relay_stream_terminals",
        "relay_sse_events",
        "relay_rejections",
        "relay_requests",
    } <= families


def test_alert_rules_cover_the_contract() -> None:
    """The alerts watch upstream errors, TTFB p95, chunk delay p99 > 5 ms, capacity, truncation."""
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
    exprs = [" ".join(rule["expr"].split()) for rule in rules]

    def watched(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    assert watched(r'relay_streams_total\{outcome="upstream_error"\}.* / .*relay_streams_total\[')
    assert watched(r"histogram_quantile\(0\.95, .*relay_time_to_first_byte_seconds_bucket.*\) > ")
    assert watched(r"histogram_quantile\(0\.99, .*relay_chunk_forward_seconds_bucket.*\) > 0\.005$")
    assert watched(r"sum by \(instance\) \(relay_active_streams\) > 0\.9 \* 2000$")
    assert watched(
        r'relay_stream_terminals_total\{terminal="none"\}.* / .*relay_stream_terminals_total\['
    )


def test_dashboard_panels_are_well_formed() -> None:
    """Panels have unique ids, non-overlapping places, and query through the datasource variable."""
    board = dashboard()
    assert board["uid"] == "wavespeed-relay"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"]
        assert all(t["expr"] for t in panel["targets"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
