"""deploy/: the Kubernetes manifests, the Compose file, the Prometheus config and alert rules, the
Dockerfile and the local stack script, checked offline.

- Kubernetes built-in kinds: kubernetes-validate's bundled JSON schemas, strict (unknown fields are
  errors), for the oldest and the newest Kubernetes version it bundles that we claim.
- KEDA ScaledObject: no bundled schema exists (kubernetes-validate's CLI only warns and exits 0);
  checked against `KEDA_SCALEDOBJECT_SCHEMA` below, the part of KEDA's CRD schema
  (config/crd/bases/keda.sh_scaledobjects.yaml, v1alpha1) for the fields we use, closed against
  unknown fields, plus the keys of KEDA's redis scaler.
- Compose: the compose-spec JSON schema that check-jsonschema vendors.
- Prometheus: `promtool check config`, `promtool check rules` and `promtool test rules` (the alert
  rules' own unit tests, deploy/prometheus/alerts.test.yml). tests/run.sh installs promtool.
- Then what ties the files together, which no schema sees: queue names, commands, Redis settings,
  memory sizing, secrets, the config file mount.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.resources
import json
import os
import re
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import psutil
import pytest
import redis
import yaml
from kombu.exceptions import OperationalError
from kubernetes_validate.utils import SchemaNotFoundError

from config.celery_app import CPU_QUEUE, GPU_QUEUE
from config.settings import Settings
from tests.cluster import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NAMESPACE = "porter"
# The oldest Kubernetes the manifests claim to work on (probe-level terminationGracePeriodSeconds
# is GA from 1.28), and the newest that kubernetes-validate bundles.
K8S_VERSIONS = ["1.28", kubernetes_validate.utils.latest_version()]
CRD_KINDS = {"ScaledObject"}
SECRET_VARS = {
    "PORTER_API_TOKEN",
    "PORTER_HOOK_SECRET",
    "PORTER_NOTIFY_SECRET",
    "PORTER_HF_WEBHOOK_SECRET",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|KEY_ID|AWS_")
# What `porter serve`'s GET /metrics exports (tasks/metrics.py) and Prometheus itself (`up`).
EXPORTED_METRICS = {
    "porter_jobs",
    "porter_jobs_finished_total",
    "porter_step_redeliveries_total",
    "porter_queue_oldest_age_seconds",
    "celery_queue_length",
    "celery_workers",
    "celery_task_failed_total",
    "up",
}


def _load_k8s() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


K8S = _load_k8s()


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in K8S if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def _workloads() -> list[dict]:
    return [d for _, d in K8S if d["kind"] in ("Deployment", "StatefulSet")]


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _porter_workloads() -> dict[str, dict]:
    """Porter's own Deployments (not Redis) by name."""
    return {
        d["metadata"]["name"]: d
        for d in _workloads()
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "porter"
    }


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _quantity(text: str | int) -> int:
    """A Kubernetes (or Compose) memory quantity in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6}
    units |= {"G": 10**9, "": 1}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(text))
    assert match and match.group(2) in units, f"not a memory quantity: {text!r}"
    return int(match.group(1)) * units[match.group(2)]


def _compose_bytes(text: str) -> int:
    """A Compose byte value: b, k, m, g with binary multiples (as docker reads them)."""
    match = re.fullmatch(r"(\d+)([bkmg]?)b?", str(text).lower())
    assert match, f"not a Compose byte value: {text!r}"
    return int(match.group(1)) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[match.group(2)]


def _flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return str(args[args.index(name) + 1])


def _duration_s(text: str) -> float:
    """A Compose duration ("2h", "90s", "1h30m") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


# --- schemas -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_bundled_kubernetes_schemas(version):
    validated, no_schema, errors = set(), set(), []
    for name, doc in K8S:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
            validated.add(doc["kind"])
        except SchemaNotFoundError:
            no_schema.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
    assert not errors, "\n".join(errors)
    assert validated >= {"Namespace", "ConfigMap", "Service", "Deployment", "StatefulSet"}
    # Only the KEDA custom resources lack a bundled schema (checked by their own test below).
    assert no_schema == CRD_KINDS


def test_the_strict_kubernetes_schema_rejects_a_misspelt_field():
    broken = copy.deepcopy(_one("Deployment", "porter-worker-cpu"))
    container = _container(broken)
    container["resourcse"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


_INT = {"type": "integer", "minimum": 0}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["periodSeconds", "type", "value"],
                "properties": {
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                },
            },
        },
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
    },
}
# The fields of KEDA's ScaledObject (keda.sh/v1alpha1) that deploy/k8s/keda.yaml may use, as in
# KEDA's CRD schema, closed against unknown fields (the API server rejects those under kubectl's
# default strict field validation). Not the whole CRD: a field added here must be checked against
# KEDA's documentation first.
KEDA_SCALEDOBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleDown": _HPA_RULES, "scaleUp": _HPA_RULES},
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# Trigger metadata keys of KEDA's `redis` scaler (pkg/scalers/redis_scaler.go), single instance.
REDIS_SCALER_KEYS = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "username",
    "usernameFromEnv",
    "passwordFromEnv",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "listName",
    "listLength",
    "activationListLength",
}


def _scaled_objects() -> list[dict]:
    return [d for _, d in K8S if d["kind"] == "ScaledObject"]


def test_scaled_objects_match_kedas_schema_and_redis_scaler():
    validator = jsonschema.Draft202012Validator(KEDA_SCALEDOBJECT_SCHEMA)
    assert len(_scaled_objects()) == 2
    for so in _scaled_objects():
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(so)]
        assert not errors, f"ScaledObject/{so['metadata']['name']}: {errors}"
        spec = so["spec"]
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            meta = trigger["metadata"]
            assert set(meta) <= REDIS_SCALER_KEYS, set(meta) - REDIS_SCALER_KEYS
            assert {"listName", "listLength"} <= set(meta)
            assert int(meta["listLength"]) >= 1
    broken = copy.deepcopy(_scaled_objects()[0])
    broken["spec"]["minReplicas"] = broken["spec"].pop("minReplicaCount")
    assert list(validator.iter_errors(broken)), "the KEDA schema let a misspelt field through"


# --- how the pieces fit --------------------------------------------------------------------------


def test_every_manifest_is_in_porters_namespace():
    for name, doc in K8S:
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == NAMESPACE
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{name}: {doc['kind']}"


def test_each_worker_scales_on_the_redis_list_of_the_queue_it_consumes():
    redis_service = _one("Service", "redis")
    (redis_port,) = [p["port"] for p in redis_service["spec"]["ports"]]
    queues_seen = set()
    for so in _scaled_objects():
        target = _one("Deployment", so["spec"]["scaleTargetRef"]["name"])
        args = _container(target)["args"]
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        # Celery's Redis transport keeps a queue's waiting messages in a list named after it.
        assert _flag(args, "--queues") == meta["listName"]
        queues_seen.add(meta["listName"])
        # One replica per `concurrency` waiting messages.
        assert int(meta["listLength"]) == int(_flag(args, "--concurrency"))
        # KEDA runs in its own namespace: Redis by its cluster DNS name, the workers' database.
        ns = redis_service["metadata"]["namespace"]
        assert meta["address"] == f"redis.{ns}.svc.cluster.local:{redis_port}"
        redis_url = _env(_container(target))["PORTER_REDIS_URL"]["value"]
        assert meta.get("databaseIndex", "0") == urlparse(redis_url).path.lstrip("/")
        # The autoscaler owns the replica count: a fixed one would be reset by every apply.
        assert "replicas" not in target["spec"], target["metadata"]["name"]
    assert queues_seen == {CPU_QUEUE, GPU_QUEUE}
    cpu = next(
        so
        for so in _scaled_objects()
        if so["spec"]["triggers"][0]["metadata"]["listName"] == CPU_QUEUE
    )
    # One CPU worker always runs: the reaper that recovers dead workers' steps lives in workers.
    assert cpu["spec"]["minReplicaCount"] >= 1


def test_every_container_has_a_memory_limit_and_requests_it():
    for workload in _workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            assert "memory" in resources.get("limits", {}), f"{where}: no memory limit"
            assert _quantity(resources["requests"]["memory"]) == _quantity(
                resources["limits"]["memory"]
            ), f"{where}: memory request differs from its limit"


def test_cpu_worker_memory_is_concurrency_times_the_planned_rank_peak_plus_overhead():
    worker = _one("Deployment", "porter-worker-cpu")
    annotations = worker["metadata"]["annotations"]
    concurrency = int(_flag(_container(worker)["args"], "--concurrency"))
    expected = concurrency * _quantity(annotations["porter/rank-peak-memory"]) + _quantity(
        annotations["porter/worker-overhead-memory"]
    )
    assert _quantity(_container(worker)["resources"]["limits"]["memory"]) == expected
    # A rank process alone is ~400 MiB (Settings.process_overhead_bytes, part of the plan's peak).
    assert _quantity(annotations["porter/rank-peak-memory"]) > Settings.process_overhead_bytes


def test_gpu_worker_takes_one_gpu_and_only_the_gpu_queue():
    gpu = _container(_one("Deployment", "porter-worker-gpu"))
    assert gpu["args"][:3] == ["worker", "--queues", GPU_QUEUE]
    assert _flag(gpu["args"], "--concurrency") == "1"
    assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    cpu = _container(_one("Deployment", "porter-worker-cpu"))
    assert cpu["args"][:3] == ["worker", "--queues", CPU_QUEUE]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})


def test_workers_get_a_warm_shutdown_long_enough_for_a_rank():
    for name in ("porter-worker-cpu", "porter-worker-gpu"):
        pod = _one("Deployment", name)["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 3600, name
        probe = _container(_one("Deployment", name))["livenessProbe"]
        # A hung worker is killed at once, not after the warm-shutdown grace.
        assert probe["terminationGracePeriodSeconds"] <= 120
        # The probe asks this pod's Celery node (hostname = pod name) through the broker.
        script = probe["exec"]["command"][-1]
        assert "app.control.ping" in script and "socket.gethostname()" in script
        compile(script, f"{name} livenessProbe", "exec")


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("porter-worker-cpu", "worker"),
        ("porter-worker-gpu", "worker"),
        ("porter-api", "serve"),
        ("porter-beat", "beat"),
    ],
)
def test_porter_containers_run_commands_the_porter_cli_accepts(name, first):
    from tasks.cli.main import build_parser as _build_parser

    container = _container(_one("Deployment", name))
    # The image's entrypoint is `tini -- porter` (deploy/Dockerfile): only the arguments are given.
    assert "command" not in container
    args = [str(a) for a in container["args"]]
    assert args[0] == first
    parsed = _build_parser().parse_args(args)
    assert parsed.command == first


def test_api_serves_on_8080_behind_its_service():
    api = _one("Deployment", "porter-api")
    container = _container(api)
    assert container["args"] == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    (port,) = container["ports"]
    assert port["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    service = _one("Service", "porter-api")
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (8080, port["name"])
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_beat_runs_with_a_standby():
    beat = _one("Deployment", "porter-beat")
    assert _container(beat)["args"][0] == "beat"
    assert beat["spec"]["replicas"] == 2


def test_redis_keeps_an_append_only_file_on_a_persistent_volume_and_never_evicts():
    redis = _one("StatefulSet", "redis")
    args = [str(a) for a in _container(redis)["args"]]
    assert _flag(args, "--appendonly") == "yes"
    assert _flag(args, "--maxmemory-policy") == "noeviction"
    data_dir = _flag(args, "--dir")
    mounts = {m["mountPath"]: m["name"] for m in _container(redis)["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert mounts[data_dir] in claims
    service = _one("Service", "redis")
    assert (
        service["spec"]["selector"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    (port,) = service["spec"]["ports"]
    # Every Porter container reaches this Service.
    for name, workload in _porter_workloads().items():
        url = urlparse(_env(_container(workload))["PORTER_REDIS_URL"]["value"])
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", port["port"]), name


def test_secrets_come_from_secret_references_never_literal_values():
    assert not [d for _, d in K8S if d["kind"] == "Secret"], "no Secret with values in git"
    for workload in _workloads():
        container = _container(workload)
        assert "envFrom" not in container
        for name, entry in _env(container).items():
            if SECRET_NAME.search(name):
                assert "value" not in entry, f"{workload['metadata']['name']}: {name} inline"
                assert "secretKeyRef" in entry["valueFrom"], name
    for name, workload in _porter_workloads().items():
        assert set(_env(_container(workload))) >= SECRET_VARS, name


def test_the_config_file_is_mounted_from_the_configmap_and_holds_known_settings():
    config_map = _one("ConfigMap", "porter-config")
    for name, workload in _porter_workloads().items():
        container = _container(workload)
        path = Path(_env(container)["PORTER_CONFIG"]["value"])
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        (volume,) = [n for n, p in mounts.items() if p == str(path.parent)]
        assert volumes[volume]["configMap"]["name"] == config_map["metadata"]["name"], name
        assert path.name in config_map["data"], name
    for text in config_map["data"].values():
        _check_porter_config(text)


def _check_porter_config(text: str) -> None:
    data = tomllib.loads(text)
    known = {f.name for f in dataclasses.fields(Settings)}
    table = data.get("porter", {})
    assert set(table) <= known, set(table) - known
    # The visibility timeout stays above the longest rank (the pipeline spec): hours, not minutes.
    assert table.get("visibility_timeout", Settings.visibility_timeout) >= 3600


# --- Compose ------------------------------------------------------------------------------------

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
COMPOSE_OF_K8S = {
    "worker": "porter-worker-cpu",
    "gpu-worker": "porter-worker-gpu",
    "api": "porter-api",
    "beat": "porter-beat",
}


def _compose_schema() -> dict:
    path = (
        importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    )
    return json.loads(path.read_text())


def test_compose_file_matches_the_compose_spec_schema():
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert not errors, errors
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["worker"]["comand"] = broken["services"]["worker"].pop("command")
    assert list(validator.iter_errors(broken)), "the compose schema let a misspelt key through"


def test_compose_runs_the_same_commands_and_sizes_as_kubernetes():
    services = COMPOSE["services"]
    for service, deployment in COMPOSE_OF_K8S.items():
        container = _container(_one("Deployment", deployment))
        assert services[service]["command"] == container["args"], service
        compose_limit = _compose_bytes(services[service]["deploy"]["resources"]["limits"]["memory"])
        assert compose_limit == _quantity(container["resources"]["limits"]["memory"]), service
        env = services[service]["environment"]
        assert urlparse(env["PORTER_REDIS_URL"]).hostname == "redis"
        # Secrets only through the env file, never in the Compose file.
        assert not [k for k in env if SECRET_NAME.search(k)], service
        assert [e["path"] for e in services[service]["env_file"]] == ["porter.env"]
    redis = _container(_one("StatefulSet", "redis"))
    assert services["redis"]["command"] == redis["args"]
    assert any(
        v.split(":")[1] == _flag(redis["args"], "--dir") for v in services["redis"]["volumes"]
    )
    assert set(COMPOSE["volumes"]) >= {v.split(":")[0] for v in services["redis"]["volumes"]}
    for worker in ("worker", "gpu-worker"):
        assert _duration_s(services[worker]["stop_grace_period"]) >= 3600
    (device,) = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert (device["count"], device["capabilities"]) == (1, ["gpu"])
    assert services["gpu-worker"]["profiles"] == ["gpu"]
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["worker"]["build"]["context"] / "deploy/Dockerfile").is_file()


def test_compose_config_file_is_where_porter_config_points():
    (config,) = COMPOSE["services"]["worker"]["configs"]
    assert config["target"] == COMPOSE["services"]["worker"]["environment"]["PORTER_CONFIG"]
    _check_porter_config(COMPOSE["configs"][config["source"]]["content"])


# --- Prometheus ----------------------------------------------------------------------------------

PROMETHEUS = DEPLOY / "prometheus"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (tests/run.sh installs the Debian package prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus; tests/run.sh does)")
    return found


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "config", "prometheus-compose.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ],
    ids=lambda a: " ".join(a),
)
def test_promtool_accepts_the_config_and_the_alerts_pass_their_unit_tests(args):
    result = subprocess.run(
        [_promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_rules() -> dict[str, dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "on", "ignoring", "and", "or",
    "unless", "increase", "rate", "absent", "bool", "group_left", "group_right",
}  # fmt: skip


def _metrics_in(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(
        r"\{[^}]*\}|\[[^\]]*\]|\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
        " ",
        without_strings,
    )
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels)) - _PROMQL_WORDS
    return {n for n in names if not re.fullmatch(r"\d.*", n)}


def test_alert_rules_use_only_metrics_that_porter_exports():
    rules = _alert_rules()
    used = set()
    for name, rule in rules.items():
        metrics = _metrics_in(rule["expr"])
        assert metrics, f"{name}: no metric found in {rule['expr']!r}"
        assert metrics <= EXPORTED_METRICS, f"{name}: {metrics - EXPORTED_METRICS}"
        used |= metrics
        assert rule["labels"]["severity"] in ("warning", "critical")
    # The alerts the deploy section asks for: failed jobs, queue age, no workers.
    assert "porter_jobs_finished_total" in _metrics_in(rules["PorterJobsFailed"]["expr"])
    assert 'state="FAILED"' in rules["PorterJobsFailed"]["expr"]
    assert "porter_queue_oldest_age_seconds" in _metrics_in(rules["PorterQueueStalled"]["expr"])
    assert "celery_workers" in _metrics_in(rules["PorterNoWorkers"]["expr"])
    assert 'queue_name="cpu"' in rules["PorterCpuWorkersDown"]["expr"]
    # Where the metrics module is present, each name is one it writes (a counter's `_total` is
    # added by the client library).
    source = ROOT / "tasks" / "metrics.py"
    if source.exists():
        text = source.read_text()
        for metric in used - {"up"}:
            assert metric in text or metric.removesuffix("_total") in text, metric


def test_prometheus_scrapes_the_api_service_once():
    api_service = _one("Service", "porter-api")
    (port,) = api_service["spec"]["ports"]
    for config, target in [
        ("prometheus.yml", f"porter-api.{NAMESPACE}.svc.cluster.local:{port['port']}"),
        ("prometheus-compose.yml", "api:8080"),
    ]:
        data = yaml.safe_load((PROMETHEUS / config).read_text())
        assert data["rule_files"] == ["alerts.yml"]
        (job,) = data["scrape_configs"]
        assert job["job_name"] == "porter-api"  # the `up{job=...}` of PorterMetricsDown
        assert job["metrics_path"] == "/metrics"
        (static,) = job["static_configs"]
        assert static["targets"] == [target], config
    assert 'job="porter-api"' in _alert_rules()["PorterMetricsDown"]["expr"]


# --- image and local stack -----------------------------------------------------------------------


def test_dockerfile_installs_cpu_torch_first_and_runs_porter():
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    torch_pin = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    (torch_line,) = [i for i, line in enumerate(lines) if "download.pytorch.org/whl/cpu" in line]
    assert f'"{torch_pin}"' in lines[torch_line]
    (install_line,) = [
        i for i, line in enumerate(lines) if re.search(r"pip install \.(\s|$)", line)
    ]
    assert torch_line < install_line
    copied = set()
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), src
                copied.add(src)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in packages["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied
    (entrypoint,) = [line for line in lines if line.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT "))[-1] == "porter"


def _worker_pids(redis_url: str) -> set[int]:
    """Main-process pids of the workers that answer a ping (their names are porter-cpu-PID@host)."""
    from celery import Celery

    replies = Celery(broker=redis_url).control.ping(timeout=0.5) or []
    return {int(name.split("@")[0].rsplit("-", 1)[1]) for reply in replies for name in reply}


def test_local_stack_restarts_a_worker_that_exits_and_stops_all(tmp_path):
    """What the pool watchdog relies on: a worker that stops itself (SIGQUIT) comes back."""
    port, api_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen(
        [str(DEPLOY / "local" / "run.sh"), "--workers", "1", "--port", str(port),
         "--api-port", str(api_port), "--dir", str(tmp_path / "stack"), "--no-beat"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        (first,) = wait_until(lambda: _worker_pids(redis_url), 90, "the worker to answer")
        os.kill(first, signal.SIGQUIT)  # what the watchdog does: Celery's cold shutdown

        def new_worker() -> set[int]:
            assert proc.poll() is None, "run.sh stopped the stack when its worker exited"
            with contextlib.suppress(redis.RedisError, OperationalError, OSError):  # redis gone
                return _worker_pids(redis_url) - {first}
            return set()

        restarted = wait_until(new_worker, 90, "a new worker to answer")
        assert len(restarted) == 1
        assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
        log = (tmp_path / "stack" / "logs" / "worker-1.log").read_text()
        assert "restarting in 1 s" in log
        assert proc.poll() is None  # the stack kept running
        proc.terminate()  # Ctrl-C or a service manager: run.sh stops everything it started
        proc.wait(60)
        group = [p for p in psutil.process_iter(["pid"]) if _in_group(p, proc.pid)]
        assert group == [], group
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.Error):
        return False


def test_local_stack_script_is_valid_bash_and_starts_beat():
    script = DEPLOY / "local" / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert re.search(r"porter beat --loglevel \w+", text)
    assert "--appendonly yes --maxmemory-policy noeviction" in text
    assert os.access(script, os.X_OK)
