"""The deployment contract, checked without a cluster.

Every kustomization under deploy/k8s (the base and each overlay) is rendered with `kubectl kustomize`
and every rendered object is validated against the Kubernetes OpenAPI schemas shipped by the
`kubernetes_validate` package, strictly (an unknown or misspelt field fails, where a cluster would
silently drop it). Then the contract between the manifests and the application is asserted: which
command each workload runs, where the probes point, that no secret value lives in a manifest, and
that every container is locked down. Each workload's environment (its ConfigMap, its env entries,
placeholders for the Secret's keys) is handed to the `conduit` code it runs, which must accept it.
Argo CD's order (migrations before the services) and the drain time dispatch needs are checked
against the application's own settings. The Containerfile cannot be built here (no container
engine), so it gets text checks for the parts the manifests rely on.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

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

# Keys a workload reads with `optional: true`, each with when the settings need it (the README's Secret
# table says the same): an operator who leaves it out otherwise must still get a working pod.
OPTIONAL_SECRETS: dict[str, Callable[[Mapping[str, str]], bool]] = {
    "KAFKA_SASL_PASSWORD": lambda env: env.get("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").startswith("SASL_"),
}
# What `conduit db migrate` and `conduit run SERVICE` do with their settings before the first
# connection (conduit/cli/__init__.py): the same calls, so a setting they would refuse fails here.
# The arguments after `conduit` come as sys.argv[1:].
SETTINGS_CHECK = """
import sys
import typer
from pydantic import ValidationError
from conduit.cli.runner import load_settings
args = sys.argv[1:]
try:
    settings = load_settings()
    if args[:1] == ["run"] and len(args) == 2:
        from conduit.services import build_service
        from shared.logs import configure_logging
        configure_logging(settings, args[1])
        build_service(args[1], settings)   # reads the service's own CONDUIT_<SERVICE>_* settings
    elif args != ["db", "migrate"]:
        sys.exit("no settings check for `conduit " + " ".join(args) + "`: add one to tests/deploy/test_k8s.py")
except typer.Exit as exc:   # load_settings has printed its one-line error
    sys.exit(exc.exit_code)
except ValidationError as exc:
    sys.exit(f"bad settings: {exc}")
"""

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


@functools.lru_cache(maxsize=None)
def placeholder_secrets() -> dict[str, str]:
    """Stand-ins for every key of the operator's `conduit-secrets`, shaped as the application checks them."""
    from cryptography.fernet import Fernet

    return {
        "DATABASE_URL": "postgresql://u:p@db:5432/conduit?sslmode=verify-full&sslrootcert=/etc/conduit/pg-ca.crt",
        "CONDUIT_SECRET_KEY": Fernet.generate_key().decode(),
        "KAFKA_SASL_PASSWORD": "placeholder-kafka-password",
    }


def optional_secret_keys(container: dict[str, Any]) -> list[str]:
    refs = [e.get("valueFrom", {}).get("secretKeyRef", {}) for e in container.get("env", [])]
    return sorted({ref["key"] for ref in refs if ref.get("optional")})


def container_environment(
    objects: tuple[dict[str, Any], ...], container: dict[str, Any], secrets: Mapping[str, str]
) -> dict[str, str]:
    """The variables Kubernetes gives ``container``: its ConfigMaps' entries (envFrom), then its env
    entries, which win; a secretKeyRef reads ``secrets``, and an optional one whose key is not there is
    left out, as Kubernetes leaves it out when the Secret lacks the key."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in of_kind(objects, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) <= {"configMapRef", "prefix"}, f"{container['name']}: envFrom {source} not resolved here"
        name = source["configMapRef"]["name"]
        assert name in maps, f"{container['name']}: envFrom names ConfigMap {name}, which is not rendered"
        env.update({source.get("prefix", "") + key: value for key, value in maps[name].items()})
    for entry in container.get("env", []):
        source = entry.get("valueFrom")
        if source is None:
            env[entry["name"]] = entry.get("value", "")
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            if ref["key"] in secrets:
                env[entry["name"]] = secrets[ref["key"]]
            else:
                assert ref.get("optional"), f"{container['name']}: no placeholder for Secret key {ref['key']}"
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[entry["name"]] = maps[ref["name"]][ref["key"]]
        else:
            raise AssertionError(f"{container['name']}: {entry['name']} comes from {source}, not resolved here")
    return env


def conduit_settings_check(command: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the settings checks of ``command`` (`conduit ...`) with exactly ``env`` (and PATH)."""
    assert command[:1] == ["conduit"], f"not a conduit command: {command}"
    return subprocess.run(
        [sys.executable, "-c", SETTINGS_CHECK, *command[1:]],
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


# Argo CD applies hooks and resources phase by phase, each phase wave by wave (lowest first); a
# resource without a hook annotation belongs to the Sync phase.
ARGO_PHASES = ("PreSync", "Sync", "PostSync")


def argo_step(obj: dict[str, Any]) -> tuple[int, int]:
    """(phase, wave) in which Argo CD applies ``obj``."""
    annotations = obj["metadata"].get("annotations", {})
    phase = annotations.get("argocd.argoproj.io/hook", "Sync")
    assert phase in ARGO_PHASES, f"{obj['kind']}/{obj['metadata']['name']}: hook {phase!r} not ordered here"
    return ARGO_PHASES.index(phase), int(annotations.get("argocd.argoproj.io/sync-wave", "0"))


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
def test_conduit_accepts_the_settings_every_workload_is_given(kustomization: str) -> None:
    # A workload whose environment the application refuses exits at once ("bad settings"): the
    # migration Job once lacked the SASL password that the production overlay's Kafka settings need.
    objects = render(kustomization)
    secrets = placeholder_secrets()
    problems = []
    for workload, spec in pod_specs(objects):
        for container in containers(spec):
            command = container.get("command", []) + container.get("args", [])
            where = f"{workload}/{container['name']} (`{' '.join(command)}`)"
            optional = optional_secret_keys(container)
            unexplained = [key for key in optional if key not in OPTIONAL_SECRETS]
            assert not unexplained, f"{where}: say in OPTIONAL_SECRETS when {unexplained} may be left out"
            # Every key of the Secret present: the workload must start.
            result = conduit_settings_check(command, container_environment(objects, container, secrets))
            if result.returncode != 0:
                problems.append(f"{where}, every Secret key present: exit {result.returncode}: {last_line(result.stderr)}")
            # An optional key left out: fine where the settings do not need it; refused, naming the
            # key, where they do (the operator must be told what is missing).
            for key in optional:
                env = container_environment(objects, container, {k: v for k, v in secrets.items() if k != key})
                result = conduit_settings_check(command, env)
                if OPTIONAL_SECRETS[key](env):
                    if result.returncode == 0 or key not in result.stderr:
                        problems.append(f"{where}, without {key}: expected a refusal naming it, got exit "
                                        f"{result.returncode}: {last_line(result.stderr)}")
                elif result.returncode != 0:
                    problems.append(f"{where}, without {key} (not needed here): exit {result.returncode}: "
                                    f"{last_line(result.stderr)}")
    assert not problems, f"{kustomization}:\n" + "\n".join(problems)


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_argo_cd_runs_the_migration_job_as_a_hook_before_the_services(kustomization: str) -> None:
    objects = render(kustomization)
    (job,) = of_kind(objects, "Job")
    annotations = job["metadata"].get("annotations", {})
    # A hook is deleted and created anew on each sync (BeforeHookCreation): a plain Job would be
    # patched, and a new image in its immutable pod template fails the sync.
    assert annotations.get("argocd.argoproj.io/hook") in {"PreSync", "Sync"}, "the Job must be an Argo CD hook"
    policies = annotations.get("argocd.argoproj.io/hook-delete-policy", "").split(",")
    assert "BeforeHookCreation" in [p.strip() for p in policies]
    # What the Job's pod needs must exist before it: a PreSync hook runs before the Sync phase creates
    # the ServiceAccount and the (hash-named) ConfigMap, and would wait for them until its deadline.
    pod = job["spec"]["template"]["spec"]
    needed = {("ServiceAccount", pod["serviceAccountName"])}
    for container in containers(pod):
        needed |= {("ConfigMap", s["configMapRef"]["name"]) for s in container.get("envFrom", []) if "configMapRef" in s}
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for kind, name in sorted(needed):
        assert (kind, name) in by_name, f"the Job needs {kind}/{name}, which is not rendered"
        assert argo_step(by_name[kind, name]) < argo_step(job), f"{kind}/{name} must be applied before the Job"
    # The services roll out only once the migrations have completed.
    for deployment in of_kind(objects, "Deployment"):
        assert argo_step(job) < argo_step(deployment), f"{deployment['metadata']['name']} must come after the Job"


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
    # ingest divides mailboxes between replicas by lease: a spare takes a lost pod's mailboxes over.
    assert deployments["conduit-ingest"]["spec"].get("replicas", 1) >= 2, "conduit-ingest: keep a spare in production"
    assert config_data(objects)["CONDUIT_ENV"] == "production"
    assert {o["metadata"].get("namespace") for o in objects} == {"conduit"}


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_dispatch_is_given_time_to_finish_its_slowest_send(kustomization: str) -> None:
    # On SIGTERM dispatch finishes every send in flight; a kill before a send's last reply leaves the
    # request failed/outcome_unknown. The longest wait is one command (connection, RCPT, ...) plus the
    # reply to the final dot of DATA, with the application's defaults unless the manifests set them.
    from services.dispatch.settings import DispatchSettings

    objects = render(kustomization)
    dispatch = deployments_by_component(objects)["dispatch"]
    (container,) = dispatch["spec"]["template"]["spec"]["containers"]
    env = container_environment(objects, container, placeholder_secrets())
    prefix = DispatchSettings.model_config["env_prefix"]
    longest = 0.0
    for field in ("smtp_timeout_seconds", "smtp_data_timeout_seconds"):
        longest += float(env.get(f"{prefix}{field}".upper(), DispatchSettings.model_fields[field].default))
    grace = dispatch["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= longest, f"dispatch's grace {grace} s is below its longest send, {longest:g} s"


@kubectl_missing
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_exchange_sync_runs_one_replica_until_it_leases_mailboxes(kustomization: str) -> None:
    # services/exchange_sync/service.py is a placeholder without mailbox leases: a second replica would
    # only do the same again. Lift this once it divides mailboxes between replicas like ingest.
    objects = render(kustomization)
    deployment = deployments_by_component(objects)["exchange-sync"]
    name = deployment["metadata"]["name"]
    assert deployment["spec"].get("replicas", 1) <= 1, f"{name}: {deployment['spec']['replicas']} replicas"
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] == name:
            assert hpa["spec"]["maxReplicas"] <= 1, f"{hpa['metadata']['name']} scales {name} above one replica"


def test_readme_names_the_topics_conduit_creates() -> None:
    # With Kafka ACLs the operator either grants CreateTopics or creates these beforehand.
    from shared.events.topics import TOPICS, dead_letter

    readme = (K8S / "README.md").read_text()
    missing = [name for name in TOPICS if f"`{name}`" not in readme]
    assert not missing, f"deploy/k8s/README.md does not name the topics {missing}"
    assert f"`{dead_letter('')}`" in readme, "deploy/k8s/README.md does not name the dead-letter topics"


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
