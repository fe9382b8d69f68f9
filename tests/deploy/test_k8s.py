"""The deployment contract, checked without a cluster.

Every kustomization under deploy/k8s (the base and each overlay) is rendered with `kubectl kustomize`
and every rendered object is validated against the Kubernetes OpenAPI schemas shipped by the
`kubernetes_validate` package, strictly (an unknown or misspelt field fails, where a cluster would
silently drop it). Then the contract between the manifests and the application is asserted: which
command each workload runs, where the probes point, that no secret value lives in a manifest, and
that every container is locked down. The Containerfile cannot be built here (no container engine),
so it gets text checks for the parts the manifests rely on.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CONTAINERFILE = REPO / "Containerfile"

# Base first, then every overlay found on disk, so a new overlay is covered without editing this file.
KUSTOMIZATIONS = ["base"] + sorted(
    f"overlays/{p.parent.name}" for p in (K8S / "overlays").glob("*/kustomization.yaml")
)

# Kubernetes resource name -> the argument of `conduit run` (service names are Python identifiers,
# resource names are DNS labels).
SERVICES = {
    "ingest": "ingest",
    "evaluate": "evaluate",
    "dispatch": "dispatch",
    "exchange-sync": "exchange_sync",
}
HEALTH_PORT = 8080
SECRET_NAME = "conduit-secrets"
# The uid the Containerfile creates; the manifests pin the same one.
CONTAINER_UID = 10001
# An env var whose name says it carries a credential must come from the Secret, never be a literal.
SECRET_LOOKING = re.compile(r"PASSWORD|SECRET|KEY|DATABASE_URL")

# The cluster version the manifests target (kubectl here is v1.32) and the newest schemas the package
# ships, so that an API removed since is caught too.
SCHEMA_VERSIONS = sorted(
    {"1.32", kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version())},
    key=lambda version: tuple(int(part) for part in version.split(".")),
)

kubectl_missing = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl (with built-in kustomize) is not installed: `apt-get install kubectl` to render deploy/k8s",
)


@functools.lru_cache(maxsize=None)
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize` produces for one kustomization (rendered once per session)."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload that runs pods."""
    for obj in objects:
        if obj["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            yield f"CronJob/{obj['metadata']['name']}", obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def deployments_by_component(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(objects, "Deployment")}


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's port as a number (probes name the container port `http`)."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"probe refers to port {port!r}, which container {container['name']} does not declare"
    return named[port]


def config_data(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    maps = of_kind(objects, "ConfigMap")
    assert len(maps) == 1, f"expected one ConfigMap (conduit-config), found {[m['metadata']['name'] for m in maps]}"
    return maps[0]["data"]


# --- rendering and schema validation ------------------------------------------------------------


@kubectl_missing
@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid_against_the_kubernetes_schema(kustomization: str, version: str) -> None:
    objects = render(kustomization)
    assert objects, f"{kustomization} rendered nothing"
    errors = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{name}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    assert not errors, f"{kustomization} against Kubernetes {version}:\n" + "\n".join(errors)


# --- what runs -------------------------------------------------------------------------------


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_one_deployment_per_service_runs_conduit_run_service(kustomization: str) -> None:
    deployments = deployments_by_component(render(kustomization))
    assert set(deployments) == set(SERVICES)
    for component, service in SERVICES.items():
        pod = deployments[component]["spec"]["template"]["spec"]
        assert len(pod["containers"]) == 1, f"{component}: one container per pod"
        container = pod["containers"][0]
        assert container["command"] + container.get("args", []) == ["conduit", "run", service]


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_are_probed_on_the_health_port(kustomization: str) -> None:
    objects = render(kustomization)
    assert config_data(objects)["CONDUIT_HEALTH_PORT"] == str(HEALTH_PORT)
    for component, deployment in deployments_by_component(objects).items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert any(p["containerPort"] == HEALTH_PORT for p in container["ports"]), component
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{component} {probe}"
            assert resolve_port(container, get["port"]) == HEALTH_PORT, f"{component} {probe}"
        # A startup probe, if any, must not check dependencies (that is readiness' job).
        if "startupProbe" in container:
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz", component


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_are_scraped_and_drained_gracefully(kustomization: str) -> None:
    for component, deployment in deployments_by_component(render(kustomization)).items():
        template = deployment["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", component
        assert annotations.get("prometheus.io/port") == str(HEALTH_PORT), component
        assert annotations.get("prometheus.io/path") == "/metrics", component
        # In-flight work is finished and committed on SIGTERM; that needs time.
        assert template["spec"]["terminationGracePeriodSeconds"] >= 60, component


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_migration_job_runs_conduit_db_migrate(kustomization: str) -> None:
    jobs = of_kind(render(kustomization), "Job")
    assert len(jobs) == 1
    pod = jobs[0]["spec"]["template"]["spec"]
    assert [c["command"] + c.get("args", []) for c in pod["containers"]] == [["conduit", "db", "migrate"]]
    assert pod["restartPolicy"] == "Never"
    assert "DATABASE_URL" in {e["name"] for e in pod["containers"][0].get("env", [])}


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_one_image_for_every_workload(kustomization: str) -> None:
    images = {c["image"] for _, spec in pod_specs(render(kustomization)) for c in containers(spec)}
    assert len(images) == 1, images
    if kustomization != "base":
        (image,) = images
        tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
        assert tag and tag != "latest", f"{kustomization} must pin an image tag, got {image!r}"


# --- secrets -------------------------------------------------------------------------------------


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_no_secret_value_in_any_manifest(kustomization: str) -> None:
    objects = render(kustomization)
    assert not of_kind(objects, "Secret"), "Secrets are created by the operator, never shipped in manifests"
    # A credential parked in the ConfigMap would dodge the env check below.
    leaked = [key for key in config_data(objects) if SECRET_LOOKING.search(key)]
    assert not leaked, f"secret-looking keys in the ConfigMap: {leaked}"
    for workload, spec in pod_specs(objects):
        for container in containers(spec):
            for env in container.get("env", []):
                if not SECRET_LOOKING.search(env["name"]):
                    continue
                assert "value" not in env, f"{workload}: {env['name']} is a literal"
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                assert ref is not None, f"{workload}: {env['name']} must come from a secretKeyRef"
                assert ref["name"] == SECRET_NAME, f"{workload}: {env['name']} reads Secret {ref['name']}"


@kubectl_missing
def test_every_secret_key_used_is_documented() -> None:
    keys = {
        env["valueFrom"]["secretKeyRef"]["key"]
        for kustomization in KUSTOMIZATIONS
        for _, spec in pod_specs(render(kustomization))
        for container in containers(spec)
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }
    assert keys >= {"DATABASE_URL", "CONDUIT_SECRET_KEY", "KAFKA_SASL_PASSWORD"}
    readme = (K8S / "README.md").read_text()
    assert not [k for k in keys if k not in readme], "document every key of conduit-secrets in deploy/k8s/README.md"


# --- hardening -----------------------------------------------------------------------------------


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_runs_locked_down(kustomization: str) -> None:
    objects = render(kustomization)
    accounts = {a["metadata"]["name"]: a for a in of_kind(objects, "ServiceAccount")}
    for workload, spec in pod_specs(objects):
        pod_security = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, workload
        assert accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False, workload
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", workload
        for container in containers(spec):
            where = f"{workload}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", CONTAINER_UID) == CONTAINER_UID, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(bound, {})), f"{where} {bound}"


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_deployment_has_a_disruption_budget_and_a_metrics_service(kustomization: str) -> None:
    objects = render(kustomization)
    budgets = of_kind(objects, "PodDisruptionBudget")
    services = of_kind(objects, "Service")
    for component, deployment in deployments_by_component(objects).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), component
        assert "app.kubernetes.io/name" in deployment["spec"]["selector"]["matchLabels"], component
        matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(matching) == 1, f"{component}: {len(matching)} PodDisruptionBudgets select it"
        scraped = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
        assert len(scraped) == 1, component
        assert [p["port"] for p in scraped[0]["spec"]["ports"]] == [HEALTH_PORT], component


# --- production ----------------------------------------------------------------------------------


@kubectl_missing
def test_production_autoscales_the_kafka_consumers() -> None:
    objects = render("overlays/production")
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    scaled = {}
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments, target
        scaled[target["name"]] = hpa
    assert set(scaled) == {"conduit-evaluate", "conduit-dispatch"}
    partitions = int(config_data(objects).get("CONDUIT_TOPIC_PARTITIONS", "4"))  # the application's default
    for name, hpa in scaled.items():
        # Consumers beyond the partition count sit idle: scaling past it only costs.
        assert hpa["spec"]["maxReplicas"] <= partitions, f"{name}: maxReplicas above {partitions} partitions"
        # The autoscaler owns the count: a replicas field would reset it on every apply.
        assert "replicas" not in deployments[name]["spec"], name
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], name
        # CPU utilisation is a percentage of the request, so the request must exist.
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert "cpu" in container["resources"]["requests"], name
    for name in ("conduit-ingest", "conduit-exchange-sync"):
        assert deployments[name]["spec"].get("replicas", 1) >= 2, f"{name}: keep a spare in production"
    assert config_data(objects)["CONDUIT_ENV"] == "production"
    assert {o["metadata"].get("namespace") for o in objects} == {"conduit"}


# --- the image -----------------------------------------------------------------------------------


def containerfile_stages() -> list[list[tuple[str, str]]]:
    """The Containerfile as stages of (INSTRUCTION, arguments), comments and continuations folded."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments.strip()))
    return stages


def test_containerfile_is_a_slim_multi_stage_build_of_the_package() -> None:
    stages = containerfile_stages()
    assert len(stages) >= 2, "build and runtime stages"
    text = CONTAINERFILE.read_text()
    assert re.search(r"python:3\.11-slim", text), "python:3.11-slim base"
    build = " ".join(args for stage in stages[:-1] for instruction, args in stage if instruction in {"COPY", "RUN"})
    assert "pyproject.toml" in build, "the package is built from pyproject.toml"
    assert re.search(r"pip (install|wheel)[^&;]* \.(\s|$)", build), "installs the repository root (`pip ... .`)"
    assert not re.search(r"\.\[|\[test\]", build), "no extras (the [test] extra stays out of the image)"
    final = stages[-1]
    final_runs = " ".join(args for instruction, args in final if instruction == "RUN")
    assert not re.search(r"build-essential|gcc|\bpip install\b", final_runs), "no build tools in the runtime stage"
    assert any(instruction == "COPY" and "--from=" in args for instruction, args in final), "runtime copies the build"


def test_containerfile_runs_conduit_as_the_manifests_expect() -> None:
    final = dict(containerfile_stages()[-1][1:])  # last instruction of each kind in the runtime stage
    assert json.loads(final["ENTRYPOINT"]) == ["conduit"]
    assert isinstance(json.loads(final["CMD"]), list), "exec-form CMD"
    user = final["USER"].partition(":")[0]
    assert user.isdigit() and int(user) == CONTAINER_UID, "numeric non-root USER matching runAsUser"
    assert str(HEALTH_PORT) in final["EXPOSE"].split()
    assert "LABEL" in final


def test_build_context_is_an_allow_list() -> None:
    lines = [l.strip() for l in (REPO / ".containerignore").read_text().splitlines()]
    rules = [l for l in lines if l and not l.startswith("#")]
    assert rules[0] == "*", "everything is excluded unless allowed"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    assert {"pyproject.toml", "conduit", "shared", "services"} <= allowed
    assert not allowed & {".venv", ".git", "tests", ".conduit"}
