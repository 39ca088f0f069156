"""deploy/kubernetes: the sidecar Deployment's probes, ports, socket, grace period and env agree
with each other and with the server's configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rerankd import config as cfg

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
KNOWN_ENV = {cfg.env_name(f.name) for cls in cfg.SECTIONS.values() for f in dataclasses.fields(cls)}


def _quantity(q: str | int | float) -> float:
    """Kubernetes quantity -> number (bytes for memory, cores for cpu)."""
    s = str(q)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suf, mult in sorted(suffixes.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(suf):
            return float(s[: -len(suf)]) * mult
    return float(s)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    assert MANIFESTS, "no manifests in deploy/kubernetes"
    out = []
    for path in MANIFESTS:
        out += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return out


@pytest.fixture(scope="module")
def pod(docs) -> dict:
    deps = [d for d in docs if d.get("kind") == "Deployment"]
    assert len(deps) == 1
    dep = deps[0]
    assert dep["apiVersion"] == "apps/v1"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    return dep["spec"]["template"]["spec"]


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers", [])) + list(pod.get("containers", []))


@pytest.fixture(scope="module")
def rerankd(pod) -> dict:
    found = [c for c in _containers(pod) if "rerankd" in c["image"].rsplit("/", 1)[-1].split(":")[0]]
    assert len(found) == 1, "exactly one rerankd container"
    c = found[0]
    if c in pod.get("initContainers", []):
        assert c.get("restartPolicy") == "Always", "an init container running rerankd must be a native sidecar"
    return c


@pytest.fixture(scope="module")
def env(rerankd) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in rerankd.get("env", []) if "value" in e}


def _listen(env: dict[str, str]) -> list[str]:
    raw = env.get("RERANKD_LISTEN", "[::]:50051")
    return [a.strip() for a in raw.split(",") if a.strip()]


def test_sidecar_next_to_an_app_container(pod, rerankd):
    apps = [c for c in pod["containers"] if c is not rerankd]
    assert apps, "an app container runs next to rerankd"
    names = [c["name"] for c in _containers(pod)]
    assert len(names) == len(set(names))


def test_env_names_are_real_settings(env):
    unknown = sorted(k for k in env if k.startswith("RERANKD_") and k not in KNOWN_ENV)
    assert not unknown, f"env sets variables the server does not read: {unknown}"


def test_metrics_are_served_on_a_declared_port(rerankd, env):
    """The reference deployment exported no metrics (a review)."""
    listen = env.get("RERANKD_METRICS_LISTEN", "")
    assert listen, "set RERANKD_METRICS_LISTEN so Prometheus can scrape rerankd"
    port = int(listen.rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in rerankd.get("ports", [])}
    assert ports.get("metrics") == port and ports.get("grpc") != port


def test_probes_hit_the_grpc_port_the_server_listens_on(rerankd, env):
    tcp_ports = {int(a.rsplit(":", 1)[1]) for a in _listen(env) if not a.startswith("unix:")}
    assert tcp_ports, "the kubelet's gRPC probes need a TCP listener"
    container_ports = {p["containerPort"]: p for p in rerankd.get("ports", [])}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = rerankd.get(kind)
        assert probe, f"rerankd needs a {kind}"
        assert "grpc" in probe, f"{kind} must use the grpc.health.v1 probe"
        port = probe["grpc"]["port"]
        assert isinstance(port, int), f"{kind}: gRPC probes take a numeric port"
        assert port in tcp_ports, f"{kind} probes port {port}, server listens on {sorted(tcp_ports)}"
        assert port in container_ports, f"{kind} probes port {port}, not a declared containerPort"
        service = probe["grpc"].get("service", "")
        assert service in ("", "rerankd.v1.Retrieval"), f"{kind}: the server reports health for '' and rerankd.v1.Retrieval"
        assert probe.get("timeoutSeconds", 1) < probe.get("periodSeconds", 10)


def test_startup_probe_allows_model_warmup(rerankd):
    sp = rerankd["startupProbe"]
    budget = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    assert budget >= 120, f"startupProbe gives only {budget}s to load and warm the models"
    lp = rerankd["livenessProbe"]
    assert lp.get("failureThreshold", 3) * lp.get("periodSeconds", 10) >= 20, "liveness too trigger-happy"


def test_grace_period_covers_the_server_drain(pod, env):
    server_grace = float(env.get("RERANKD_GRACE_PERIOD_S", cfg.ServerConfig().grace_period_s))
    assert pod.get("terminationGracePeriodSeconds", 30) > server_grace


def test_resources_fit_the_models(rerankd, env):
    res = rerankd["resources"]
    cpu = _quantity(res["limits"]["cpu"])
    assert cpu == 2 and _quantity(res["requests"]["cpu"]) == 2
    mem = _quantity(res["limits"]["memory"])
    assert 1.4 * 2**30 <= mem <= 4 * 2**30
    assert _quantity(res["requests"]["memory"]) <= mem
    # ONNX Runtime would otherwise size its thread pool by the node's cores.
    assert "RERANKD_THREADS" in env and 1 <= int(env["RERANKD_THREADS"]) <= cpu


def test_volumes_data_and_shared_socket(pod, rerankd, env):
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in rerankd.get("volumeMounts", [])}
    data_dir = env.get("RERANKD_DATA_DIR", "/data")
    assert data_dir in mounts, f"{data_dir} must be a volume"
    data_vol = volumes[mounts[data_dir]]
    assert "emptyDir" in data_vol or "persistentVolumeClaim" in data_vol
    for m in mounts.values():
        assert m in volumes, f"volume {m} is mounted but not defined"

    sockets = [a[len("unix://"):] for a in _listen(env) if a.startswith("unix://")]
    assert sockets, "the sidecar listens on a Unix socket too"
    sock_dir = str(Path(sockets[0]).parent)
    assert sock_dir in mounts, f"socket dir {sock_dir} must be a shared volume"
    shared = mounts[sock_dir]
    apps = [c for c in pod["containers"] if c is not rerankd]
    for app in apps:
        app_mounts = {m["mountPath"]: m["name"] for m in app.get("volumeMounts", [])}
        assert app_mounts.get(sock_dir) == shared, f"{app['name']} must mount {shared} at {sock_dir}"
        targets = [e.get("value", "") for e in app.get("env", []) if e["name"] == "RERANKD_TARGET"]
        assert targets and targets[0] in {f"unix://{sockets[0]}", "localhost:50051", "127.0.0.1:50051"}


def test_runs_as_non_root(pod, rerankd):
    sc = {**pod.get("securityContext", {}), **rerankd.get("securityContext", {})}
    assert sc.get("runAsNonRoot") is True
    assert sc.get("runAsUser", 10001) != 0
    assert rerankd.get("securityContext", {}).get("allowPrivilegeEscalation") is False
