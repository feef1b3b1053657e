"""The Helm chart (deploy/helm/streamer) lints, renders, and renders what the service needs.

Helm is the pinned build from deploy/helm/helmctl, cached outside the repository; on a machine
without it the first test that needs it builds it from the Go module proxy (a few minutes),
hence the 600 s timeouts. Expected numbers come from the service's own formulas
(``Settings.shared_memory_bytes``, ``Settings.max_message_bytes``), so the chart cannot drift
from the service either. No cluster is involved: these tests read rendered manifests.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamer.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "streamer"
EXAMPLES = ROOT / "deploy" / "helm" / "examples"
HELMCTL = ROOT / "deploy" / "helm" / "helmctl"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RELEASE = "streamer"

# Any test may be the first to ask for Helm, and so pay for building it.
BUILDS_HELM = pytest.mark.timeout(600)
VARIANTS = ["default", "gpu", "exactly-once", "sasl", "static-membership", "strimzi-topics"]


@pytest.fixture(scope="module")
def helm() -> str:
    cached = Path.home() / ".cache" / "streamer" / "helm"
    if shutil.which("go") is None and not cached.exists():
        pytest.skip("Go is needed once to build the pinned Helm (deploy/helm/helmctl)")
    result = subprocess.run(
        [str(HELMCTL), "path"], capture_output=True, text=True, timeout=590, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _values_files(variant: str) -> list[str]:
    return [] if variant == "default" else ["-f", str(EXAMPLES / f"{variant}.yaml")]


def _helm_template(helm: str, variant: str, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [helm, "template", RELEASE, str(CHART), *_values_files(variant)]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


class Manifests:
    """The rendered objects of one `helm template`, looked up by kind."""

    def __init__(self, text: str) -> None:
        self.objects = [doc for doc in yaml.safe_load_all(text) if doc]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def workload(self) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet")]
        assert len(found) == 1, [o["kind"] for o in found]
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.workload["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1
        container: dict[str, Any] = containers[0]
        return container

    @property
    def config(self) -> dict[str, str]:
        """The STREAMER_* settings of the ConfigMap the container reads with envFrom."""
        names = {ref["configMapRef"]["name"] for ref in self.container["envFrom"]}
        maps = [m for m in self.all("ConfigMap") if m["metadata"]["name"] in names]
        assert len(maps) == 1
        data: dict[str, str] = maps[0]["data"]
        return data

    def env(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.container.get("env", []) if e["name"] == name), None)

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    def mount(self, path: str) -> dict[str, Any]:
        return next(m for m in self.container["volumeMounts"] if m["mountPath"] == path)


def render(helm: str, variant: str = "default", *sets: str) -> Manifests:
    result = _helm_template(helm, variant, *sets)
    assert result.returncode == 0, result.stderr
    return Manifests(result.stdout)


def values(variant: str = "default") -> dict[str, Any]:
    """values.yaml with the variant's file merged over it, as Helm merges them."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base)
        for key, value in over.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merged[key] = merge(base[key], value)
            else:
                merged[key] = value
        return merged

    result: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    if variant != "default":
        result = merge(result, yaml.safe_load((EXAMPLES / f"{variant}.yaml").read_text()))
    return result


def alert_rules() -> Iterator[dict[str, Any]]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        yield from group["rules"]


# ------------------------------------------------------------------------- chart as a whole


@pytest.mark.timeout(10)
def test_chart_rules_are_a_copy_of_the_project_rules() -> None:
    copy = CHART / "files" / "alerts.yml"
    assert copy.read_bytes() == ALERTS.read_bytes(), (
        "deploy/helm/streamer/files/alerts.yml differs from deploy/prometheus/alerts.yml:"
        " run deploy/helm/helmctl sync-rules"
    )


@BUILDS_HELM
def test_helmctl_gives_the_pinned_version(helm: str) -> None:
    assert not Path(helm).resolve().is_relative_to(ROOT), "the Helm binary belongs in a cache"
    again = subprocess.run(
        [str(HELMCTL), "path"], capture_output=True, text=True, timeout=60, check=True
    )
    assert again.stdout.strip() == helm and "building" not in again.stderr
    version = subprocess.run(
        [helm, "version", "--template", "{{.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert version.stdout == "v4.3.2"


@BUILDS_HELM
@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_lints_strictly(helm: str, variant: str) -> None:
    result = subprocess.run(
        [helm, "lint", "--strict", str(CHART), *_values_files(variant)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@BUILDS_HELM
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_setting_names_a_service_setting(helm: str, variant: str) -> None:
    manifests = render(helm, variant)
    env_names = [e["name"] for e in manifests.container.get("env", [])]
    for name in [*manifests.config, *env_names]:
        if name.startswith("STREAMER_"):
            assert name.removeprefix("STREAMER_").lower() in Settings.model_fields, name
    assert "STREAMER_SASL_PASSWORD" not in manifests.config
    assert "STREAMER_SASL_PASSWORD" not in env_names


# ------------------------------------------------------------------------- the pod


@BUILDS_HELM
@pytest.mark.parametrize(
    ("variant", "sets"),
    [
        ("default", ()),
        ("gpu", ()),
        ("default", ("maxInFlight=7", "maxPayloadBytes=1048576", "maxBatchSize=4")),
    ],
)
def test_shm_volume_is_the_slot_pool_bound(helm: str, variant: str, sets: tuple[str, ...]) -> None:
    manifests = render(helm, variant, *sets)
    config = manifests.config
    service = Settings.model_construct(
        max_in_flight=int(config["STREAMER_MAX_IN_FLIGHT"]),
        max_payload_bytes=int(config["STREAMER_MAX_PAYLOAD_BYTES"]),
    )
    expected = service.shared_memory_bytes + values()["sharedMemory"]["marginBytes"]

    shm = manifests.volume(manifests.mount("/dev/shm")["name"])
    assert shm["emptyDir"]["medium"] == "Memory"
    assert int(shm["emptyDir"]["sizeLimit"]) == expected
    # The environment holds the values the bound was computed from.
    wanted = values(variant)
    for item in sets:
        key, value = item.split("=")
        wanted[key] = int(value)
    assert service.max_in_flight == wanted["maxInFlight"]
    assert service.max_payload_bytes == wanted["maxPayloadBytes"]


@BUILDS_HELM
def test_probes_use_the_metrics_port_on_every_interface(helm: str) -> None:
    manifests = render(helm)
    container = manifests.container
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == 9108
    assert manifests.config["STREAMER_METRICS_PORT"] == "9108"
    assert manifests.config["STREAMER_METRICS_HOST"] == "0.0.0.0"


@BUILDS_HELM
@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_runs_as_non_root_on_a_read_only_root(helm: str, variant: str) -> None:
    manifests = render(helm, variant)
    pod_context = manifests.pod["securityContext"]
    context = manifests.container["securityContext"]
    assert pod_context["runAsNonRoot"] is True
    assert pod_context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert manifests.pod["automountServiceAccountToken"] is False
    # torch writes its cache under TORCH_HOME: it must be a mounted emptyDir, as must HOME.
    for name in ("HOME", "TORCH_HOME"):
        env = manifests.env(name)
        assert env is not None, name
        mounted = [
            m
            for m in manifests.container["volumeMounts"]
            if Path(env["value"]).is_relative_to(m["mountPath"])
        ]
        assert mounted, f"{name}={env['value']} is on the read-only root"
        assert "emptyDir" in manifests.volume(mounted[0]["name"])


@BUILDS_HELM
def test_gpu_variant_requests_a_gpu_and_runs_on_cuda(helm: str) -> None:
    gpu = render(helm, "gpu")
    resources = gpu.container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    # The GPU is added to the values' resources, which stay as they were.
    for kind in ("limits", "requests"):
        wanted = values("gpu")["resources"][kind]
        assert {k: v for k, v in resources[kind].items() if k != "nvidia.com/gpu"} == wanted
    assert gpu.config["STREAMER_DEVICE"] == "cuda"

    cpu = render(helm)
    assert "nvidia.com/gpu" not in cpu.container["resources"].get("limits", {})
    assert cpu.config["STREAMER_DEVICE"] == "cpu"


@BUILDS_HELM
def test_sasl_password_is_a_mounted_file_from_the_existing_secret(helm: str) -> None:
    manifests = render(helm, "sasl")
    sasl = values("sasl")["kafka"]["sasl"]
    path = manifests.config["STREAMER_SASL_PASSWORD_FILE"]
    mount = next(
        m for m in manifests.container["volumeMounts"] if Path(path).parent == Path(m["mountPath"])
    )
    assert mount["readOnly"] is True
    secret = manifests.volume(mount["name"])["secret"]
    assert secret["secretName"] == sasl["existingSecret"]
    assert {"key": sasl["passwordKey"], "path": Path(path).name} in secret["items"]
    assert manifests.all("Secret") == [], "an existing Secret is used, not a new one"
    assert manifests.config["STREAMER_SASL_MECHANISM"] == sasl["mechanism"]
    assert manifests.config["STREAMER_SASL_USERNAME"] == sasl["username"]
    # The CA bundle is a mounted file too.
    ca = manifests.config["STREAMER_SSL_CAFILE"]
    assert any(Path(ca).parent == Path(m["mountPath"]) for m in manifests.container["volumeMounts"])


@BUILDS_HELM
def test_sasl_password_given_inline_becomes_a_secret_mounted_as_a_file(helm: str) -> None:
    manifests = render(helm, "sasl", "kafka.sasl.existingSecret=", "kafka.sasl.password=s3cret")
    secret = manifests.one("Secret")
    assert "s3cret" not in yaml.safe_dump(manifests.config)
    path = Path(manifests.config["STREAMER_SASL_PASSWORD_FILE"])
    volume = manifests.volume(manifests.mount(str(path.parent))["name"])
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert path.name in secret["data"]


# ------------------------------------------------------------------------- KEDA


@BUILDS_HELM
@pytest.mark.parametrize("variant", ["default", "gpu", "static-membership"])
def test_keda_scales_on_the_input_topic_lag(helm: str, variant: str) -> None:
    manifests = render(helm, variant)
    scaled = manifests.one("ScaledObject")["spec"]
    wanted = values(variant)
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert metadata["bootstrapServers"] == wanted["kafka"]["bootstrapServers"]
    assert metadata["consumerGroup"] == manifests.config["STREAMER_GROUP_ID"]
    assert metadata["topic"] == manifests.config["STREAMER_INPUT_TOPIC"]
    rate = wanted["autoscaling"]["perInstanceRate"]
    budget = wanted["autoscaling"]["latencyBudgetSeconds"]
    assert metadata["lagThreshold"] == str(int(rate * budget))
    assert scaled["maxReplicaCount"] == wanted["autoscaling"]["maxReplicas"]
    assert scaled["maxReplicaCount"] <= wanted["topics"]["input"]["partitions"]
    assert scaled["scaleTargetRef"]["kind"] == manifests.workload["kind"]
    assert scaled["scaleTargetRef"]["name"] == manifests.workload["metadata"]["name"]
    assert "replicas" not in manifests.workload["spec"], "KEDA owns the replica count"


@BUILDS_HELM
def test_keda_authenticates_like_the_service(helm: str) -> None:
    manifests = render(helm, "sasl")
    trigger = manifests.one("ScaledObject")["spec"]["triggers"][0]
    auth = manifests.one("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secrets = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    sasl = values("sasl")["kafka"]["sasl"]
    assert secrets["password"]["name"] == sasl["existingSecret"]
    assert secrets["password"]["key"] == sasl["passwordKey"]
    assert "ca" in secrets


@BUILDS_HELM
@pytest.mark.parametrize(
    "sets",
    [
        ("autoscaling.maxReplicas=13",),
        ("autoscaling.enabled=false", "replicaCount=13"),
        ("topics.input.partitions=4",),
    ],
)
def test_rendering_fails_with_more_replicas_than_input_partitions(
    helm: str, sets: tuple[str, ...]
) -> None:
    result = _helm_template(helm, "default", *sets)
    assert result.returncode != 0
    assert "exceeds topics.input.partitions" in result.stderr


@BUILDS_HELM
def test_replicas_up_to_the_partition_count_render(helm: str) -> None:
    manifests = render(helm, "default", "autoscaling.maxReplicas=12", "topics.input.partitions=12")
    assert manifests.one("ScaledObject")["spec"]["maxReplicaCount"] == 12


# ------------------------------------------------------------------------- workload kinds


@BUILDS_HELM
def test_static_membership_is_a_statefulset_named_by_pod(helm: str) -> None:
    manifests = render(helm, "static-membership")
    workload = manifests.workload
    assert workload["kind"] == "StatefulSet"
    service = manifests.one("Service")
    assert workload["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    instance_id = manifests.env("STREAMER_GROUP_INSTANCE_ID")
    assert instance_id is not None
    assert instance_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert manifests.config["STREAMER_SESSION_TIMEOUT_MS"] == "60000"

    default = render(helm)
    assert default.workload["kind"] == "Deployment"
    assert default.env("STREAMER_GROUP_INSTANCE_ID") is None


@BUILDS_HELM
def test_delivery_is_at_least_once_unless_asked(helm: str) -> None:
    assert render(helm).config["STREAMER_DELIVERY"] == "at-least-once"
    exactly_once = render(helm, "exactly-once")
    assert exactly_once.config["STREAMER_DELIVERY"] == "exactly-once"
    drain = float(exactly_once.config["STREAMER_DRAIN_TIMEOUT_S"])
    assert exactly_once.pod["terminationGracePeriodSeconds"] > drain


@BUILDS_HELM
def test_settings_reach_the_environment_and_chart_values_cannot_be_overridden(helm: str) -> None:
    manifests = render(helm, "default", "settings.precision=bf16", "settings.top_k=3")
    assert manifests.config["STREAMER_PRECISION"] == "bf16"
    assert manifests.config["STREAMER_TOP_K"] == "3"
    refused = _helm_template(helm, "default", "settings.max_in_flight=3")
    assert refused.returncode != 0
    assert "settings.max_in_flight" in refused.stderr


# ------------------------------------------------------------------------- monitoring, topics


@BUILDS_HELM
def test_prometheus_rule_carries_every_project_alert(helm: str) -> None:
    rule = render(helm).one("PrometheusRule")
    rendered = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    source = list(alert_rules())
    assert sorted(rendered) == sorted(r["alert"] for r in source)
    for alert in source:
        assert rendered[alert["alert"]] == alert, alert["alert"]


@BUILDS_HELM
def test_pod_monitor_scrapes_the_job_the_alerts_expect(helm: str) -> None:
    manifests = render(helm)
    monitor = manifests.one("PodMonitor")["spec"]
    labels = manifests.workload["spec"]["template"]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    endpoint = monitor["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    target_down = next(r for r in alert_rules() if r["alert"] == "StreamerTargetDown")
    job = next(r for r in endpoint["relabelings"] if r["targetLabel"] == "job")
    assert f'job="{job["replacement"]}"' in target_down["expr"]


@BUILDS_HELM
@pytest.mark.parametrize("payload", [8388608, 65536])
def test_strimzi_topics_accept_the_largest_record(helm: str, payload: int) -> None:
    manifests = render(helm, "strimzi-topics", f"maxPayloadBytes={payload}")
    topics = {t["spec"]["topicName"]: t for t in manifests.all("KafkaTopic")}
    wanted = values("strimzi-topics")
    assert sorted(topics) == sorted(wanted["topics"][r]["name"] for r in ("input", "output", "dlq"))
    largest = Settings.model_construct(max_payload_bytes=payload).max_message_bytes
    for role in ("input", "output", "dlq"):
        topic = topics[wanted["topics"][role]["name"]]
        assert topic["spec"]["partitions"] == wanted["topics"][role]["partitions"]
        assert topic["spec"]["config"]["max.message.bytes"] == largest
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
    assert render(helm).all("KafkaTopic") == [], "off by default"
