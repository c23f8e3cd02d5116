"""The deployment files against the project and against the schemas of what reads them.

``cogenesis manifests`` (KubeRay's RayService, the bus's Redis Deployment/Service, a launcher's Serve config, the
Redis aclfile) and the Ray cluster launcher's ``configs/cluster/*.yaml``: the committed files are what the command
writes, the standard Kubernetes objects pass Kubernetes' own schema, the launcher configs pass Ray's, and every
image, port and secret they name agrees with ``configs/serve.yaml``, the Dockerfile and the code that reads them.
Nothing here starts Ray; one test starts the bundled redis-server with the manifest's own flags.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cogenesis.apps import manifests as m
from cogenesis.apps.cli import build_parser, main
from cogenesis.core.config import CloudConfig
from cogenesis.core.secrets import REDIS_ROLES, SecretsDir

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "configs" / "k8s"
LAUNCHER = {name: REPO / "configs" / "cluster" / f"{name}.yaml" for name in ("aws", "gcp")}
# A recent Kubernetes that kubernetes-validate ships a schema of (and EKS, GKE and AKS all run).
K8S_VERSION = "1.33"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rayservice() -> dict[str, Any]:
    (doc,) = _docs(K8S / "rayservice.yaml")
    return doc


def _redis() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in _docs(K8S / "redis.yaml")}


def _ray_pods(rs: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def _pods() -> list[dict[str, Any]]:
    return _ray_pods(_rayservice()) + [_redis()["Deployment"]["spec"]["template"]]


def _images(obj: Any) -> list[str]:
    """Every ``image`` value anywhere in ``obj``."""
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "image" and isinstance(v, str)] + [
            i for v in obj.values() for i in _images(v)
        ]
    if isinstance(obj, list):
        return [i for v in obj for i in _images(v)]
    return []


def _serve_yaml_args() -> dict[str, Any]:
    (args,) = {json.dumps(a["args"], sort_keys=True) for a in m.load_serve_config()["applications"]}
    return json.loads(args)


# ---- the committed files are the command's output ----------------------------------------------------------------


def test_the_committed_manifests_are_exactly_what_the_command_writes(tmp_path, capsys):
    assert main(["manifests", "k8s", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kubectl create secret generic cogenesis-secrets" in out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in K8S.iterdir()) == ["rayservice.yaml", "redis.yaml"]
    for name in written:
        assert (tmp_path / name).read_text() == (K8S / name).read_text(), (
            f"configs/k8s/{name} drifted from `cogenesis manifests k8s`: regenerate it with that command"
        )


def test_the_deployment_constants_agree_with_the_project():
    import importlib.metadata

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    version = pyproject["project"]["version"]
    assert (version, f"cogenesis-serve:{version}") == (m.PROJECT_VERSION, m.IMAGE)
    assert importlib.metadata.version("ray") == m.RAY_VERSION
    args = _serve_yaml_args()
    assert args["secrets_dir"] == m.SECRETS_MOUNT
    assert int(args["redis_url"].rsplit(":", 1)[1].split("/")[0]) == m.REDIS_PORT
    assert CloudConfig().http_port == m.SERVE_PORT
    assert m.RAY_GCS_PORT not in (6379, m.REDIS_PORT, m.DASHBOARD_PORT, m.SERVE_PORT, m.RAY_METRICS_PORT)


# ---- serveConfigV2 ---------------------------------------------------------------------------------------------------


def test_serve_config_v2_is_serve_yaml_but_for_the_documented_overrides():
    served = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    original = m.load_serve_config()
    assert [a["name"] for a in served["applications"]] == [a["name"] for a in original["applications"]]
    for got, want in zip(served["applications"], original["applications"]):
        assert {k: v for k, v in got.items() if k != "args"} == {k: v for k, v in want.items() if k != "args"}
        changed = {k for k in set(got["args"]) | set(want["args"]) if got["args"].get(k) != want["args"].get(k)}
        assert changed <= set(m.K8S_OVERRIDES), f"undocumented differences: {changed - set(m.K8S_OVERRIDES)}"
        assert {k: got["args"][k] for k in m.K8S_OVERRIDES} == m.K8S_OVERRIDES
    rest = {k: v for k, v in served.items() if k != "applications"}
    assert rest == {k: v for k, v in original.items() if k != "applications"}


def test_serve_config_v2_is_a_config_serve_deploys():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(_rayservice()["spec"]["serveConfigV2"]))
    assert [a.route_prefix for a in schema.applications] == ["/cloud", "/"]
    for app in yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"]:
        CloudConfig.model_validate(app["args"])  # what the replicas will validate


def test_the_in_cluster_redis_url_names_the_redis_service_and_its_port():
    service = _redis()["Service"]
    url = m.K8S_OVERRIDES["redis_url"]
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    assert host == service["metadata"]["name"] == m.REDIS_SERVICE
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]


def test_a_bad_override_fails_at_render_time_not_in_a_replica():
    from cogenesis.core.errors import ConfigError

    with pytest.raises(ConfigError, match="redis_urll"):
        m.render_serve_config({"redis_urll": "redis://x:6380/0"})


# ---- Kubernetes schemas ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_the_redis_objects_pass_the_kubernetes_schema(kind):
    import kubernetes_validate

    assert kubernetes_validate.validate(_redis()[kind], K8S_VERSION, strict=True) == K8S_VERSION


def test_the_rayservice_pod_templates_pass_the_kubernetes_schema():
    import kubernetes_validate

    for template in _ray_pods(_rayservice()):
        obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION


def test_the_rayservice_has_the_fields_kuberay_requires():
    # No installed package ships the RayService CRD (kubernetes-validate has Kubernetes' own kinds only, ray's wheel
    # has no KubeRay schema), so its CRD-specific fields are checked here by hand and its pod templates against
    # Kubernetes' PodTemplateSpec schema above.
    rs = _rayservice()
    assert (rs["apiVersion"], rs["kind"], rs["metadata"]["name"]) == ("ray.io/v1", "RayService", m.RAYSERVICE_NAME)
    assert isinstance(rs["spec"]["serveConfigV2"], str)
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == m.RAY_VERSION
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)  # authOptions needs Ray >= 2.52
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    for group in (head, *groups):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"
        assert group["template"]["spec"]["containers"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert int(head["rayStartParams"]["port"]) == m.RAY_GCS_PORT
    (gpu,) = groups
    assert gpu["groupName"] and 0 < gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"


# ---- images, Secrets, ports ------------------------------------------------------------------------------------------


def test_every_image_is_the_default_one():
    assert set(_images(_rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"])) == {m.IMAGE}
    assert set(_images(_rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"])) == {m.IMAGE + m.GPU_SUFFIX}
    assert set(_images(list(_redis().values()))) == {m.IMAGE}


@pytest.mark.parametrize(
    "image, gpu_flags, gpu",
    [
        (
            "registry.example.com:5000/team/cogenesis-serve:1.2.3",
            [],
            "registry.example.com:5000/team/cogenesis-serve:1.2.3-gpu",
        ),
        ("localhost:5000/cogenesis-serve:1", [], "localhost:5000/cogenesis-serve:1-gpu"),
        ("team/cogenesis-serve:1.2.3", ["--gpu-image", "team/cg-gpu:9"], "team/cg-gpu:9"),
        (f"ghcr.io/o/cg@sha256:{'a' * 64}", ["--gpu-image", "ghcr.io/o/cg:2-gpu"], "ghcr.io/o/cg:2-gpu"),
    ],
)
def test_every_image_is_the_one_given(image, gpu_flags, gpu, tmp_path):
    assert main(["manifests", "k8s", "--out", str(tmp_path), "--image", image, *gpu_flags]) == 0
    (rs,) = _docs(tmp_path / "rayservice.yaml")
    redis_docs = _docs(tmp_path / "redis.yaml")
    assert set(_images(rs["spec"]["rayClusterConfig"]["headGroupSpec"])) == {image}
    assert set(_images(rs["spec"]["rayClusterConfig"]["workerGroupSpecs"])) == {gpu}
    assert set(_images(redis_docs)) == {image}


@pytest.mark.parametrize(
    "image, why",
    [
        ("cogenesis-serve", "not pinned"),
        ("cogenesis-serve:latest", "not pinned"),
        ("Cogenesis-Serve:1", "not an image reference"),
        ("cogenesis serve:1", "not an image reference"),
        ("cogenesis-serve:", "not an image reference"),
    ],
)
def test_a_bad_image_is_a_one_line_error_with_a_hint(image, why, tmp_path, capsys):
    assert main(["manifests", "k8s", "--image", image, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: invalid --image") and why in err[0]
    assert err[1].startswith("  hint:") and len(err) == 2
    assert not list(tmp_path.iterdir())


def test_a_digest_pinned_image_needs_its_gpu_image_named(tmp_path, capsys):
    assert main(["manifests", "k8s", "--image", f"ghcr.io/o/cg@sha256:{'a' * 64}", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot derive the GPU image" in err and "--gpu-image" in err


def test_an_unwritable_out_is_a_one_line_error_with_a_hint(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["manifests", "k8s", "--out", str(blocker / "k8s")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: cannot write to --out {blocker / 'k8s'}") and err[1].startswith("  hint:")


def test_every_secret_and_volume_referenced_is_defined():
    for pod in _pods():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for container in pod["spec"]["containers"]:
            assert {mnt["name"] for mnt in container["volumeMounts"]} <= set(volumes)
        secrets = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
        assert secrets <= {m.SECRET_NAME, m.REDIS_ACL_SECRET}
    for pod in _ray_pods(_rayservice()):
        (container,) = pod["spec"]["containers"]
        mount = next(x for x in container["volumeMounts"] if x["mountPath"] == m.SECRETS_MOUNT)
        assert mount["readOnly"] is True
        volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == m.SECRET_NAME
        assert [(i["key"], i["path"]) for i in volume["secret"]["items"]] == m.secret_items()
        assert {"name": "COGENESIS_SECRETS_DIR", "value": m.SECRETS_MOUNT} in container["env"]
    redis_pod = _redis()["Deployment"]["spec"]["template"]
    (redis_container,) = redis_pod["spec"]["containers"]
    acl = redis_container["args"][redis_container["args"].index("--aclfile") + 1]
    mount = next(x for x in redis_container["volumeMounts"] if acl.startswith(x["mountPath"] + "/"))
    volume = next(v for v in redis_pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == m.REDIS_ACL_SECRET
    assert [i["path"] for i in volume["secret"]["items"]] == [acl.removeprefix(mount["mountPath"] + "/")]


def test_the_secret_volume_rebuilds_the_secrets_directory_the_code_reads(tmp_path):
    """Each file of a real secrets directory is one Secret key, and the volume's items put it back where
    SecretsDir looks. ray.token is the launcher's alone: KubeRay's authOptions make the Ray token in Kubernetes."""
    made = SecretsDir.create(tmp_path / "made")
    files = {str(p.relative_to(made.path)) for p in made.path.rglob("*") if p.is_file()}
    mapped = {path for _, path in m.secret_items()}
    assert mapped == files - {m.RAY_TOKEN_FILE}
    mounted = tmp_path / "mounted"
    for key, path in m.secret_items():  # what the kubelet does with `kubectl create secret --from-file=key=...`
        (mounted / path).parent.mkdir(parents=True, exist_ok=True)
        (mounted / path).write_bytes((made.path / path).read_bytes())
        assert re.fullmatch(r"[-._a-zA-Z0-9]+", key), f"{key} is not a valid Secret key"
    got = SecretsDir(mounted)
    assert got.cluster_key() == made.cluster_key()
    assert [got.redis(r) for r in REDIS_ROLES] == [made.redis(r) for r in REDIS_ROLES]
    assert (got.token("admin"), got.token("worker")) == (made.token("admin"), made.token("worker"))
    for line in m.kubectl_secret_commands(str(made.path)):
        for ref in re.findall(r"--from-file=[^=]+=(\S+)", line):
            assert Path(ref).is_file() or ref == m.REDIS_ACL_KEY


def test_every_port_referenced_is_defined():
    rs = _rayservice()
    for pod in _pods():
        (container,) = pod["spec"]["containers"]
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["tcpSocket"]["port"] in names
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["gcs-server"] == int(head["rayStartParams"]["port"]) == m.RAY_GCS_PORT
    assert head_ports["dashboard"] == m.DASHBOARD_PORT and head_ports["serve"] == m.SERVE_PORT
    redis = _redis()
    (redis_container,) = redis["Deployment"]["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in redis_container["ports"]}
    for port in redis["Service"]["spec"]["ports"]:
        assert named[port["targetPort"]] == port["port"] == m.REDIS_PORT
    assert redis_container["args"][redis_container["args"].index("--port") + 1] == str(m.REDIS_PORT)
    selector = redis["Service"]["spec"]["selector"]
    assert selector.items() <= redis["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    assert redis["Deployment"]["spec"]["selector"]["matchLabels"] == selector


def test_the_metrics_annotations_name_the_ray_metrics_port_of_every_ray_pod():
    from cogenesis.core import metrics

    cluster = _rayservice()["spec"]["rayClusterConfig"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        notes = group["template"]["metadata"]["annotations"]
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
        assert int(notes["prometheus.io/port"]) == int(group["rayStartParams"]["metrics-export-port"])
        assert int(notes["prometheus.io/port"]) == ports["metrics"] == m.RAY_METRICS_PORT
    # the replicas' own cogenesis_* registries listen on a loopback port picked at start (announced on the bus): if
    # they ever get a fixed port, annotate that one (cogenesis.apps.manifests.RAY_METRICS_PORT's comment)
    import inspect

    assert inspect.signature(metrics.serve).parameters["port"].default == 0


# ---- the bus's Redis, run with the manifest's own flags ------------------------------------------------------------


def test_redis_acl_writes_the_aclfile_privately(tmp_path, capsys):
    from cogenesis.cluster.acl import render_aclfile

    secrets = SecretsDir.create(tmp_path / "s")
    out = tmp_path / "acl" / "users.acl"
    assert main(["manifests", "redis-acl", "--secrets-dir", str(secrets.path), "--out", str(out)]) == 0
    assert out.read_text() == render_aclfile(secrets, 6)
    assert out.stat().st_mode & 0o777 == 0o600
    assert all(secrets.redis(r).password not in out.read_text() for r in REDIS_ROLES)  # hashes only
    assert main(["manifests", "redis-acl", "--secrets-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "cogenesis token secret" in err


def test_the_redis_deployment_runs_locked_with_its_own_flags(tmp_path):
    import redis

    from cogenesis.cluster.redis_server import find_redis_server, free_port

    secrets = SecretsDir.create(tmp_path / "s")
    acl = tmp_path / "users.acl"
    assert main(["manifests", "redis-acl", "--secrets-dir", str(secrets.path), "--out", str(acl)]) == 0
    (container,) = _redis()["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    port = free_port()
    # the manifest's flags, but on loopback, a free port and this test's paths
    for flag, value in (
        ("--bind", "127.0.0.1"),
        ("--port", str(port)),
        ("--aclfile", str(acl)),
        ("--dir", str(tmp_path)),
    ):
        args[args.index(flag) + 1] = value
    assert container["command"] == ["redis-server"]
    proc = subprocess.Popen([find_redis_server(), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        admin = secrets.redis("admin")
        client = redis.Redis(port=port, username=admin.username, password=admin.password, socket_timeout=2)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"redis-server exited: {proc.stdout.read().decode() if proc.stdout else ''}")
                import time

                time.sleep(0.05)
        assert client.info("persistence")["aof_enabled"] == 0  # and it started, so `--save ""` parsed
        with pytest.raises(redis.exceptions.NoPermissionError):  # not even admin may touch the config
            client.config_get("save")
        anonymous = redis.Redis(port=port, socket_timeout=2)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()
        for role in REDIS_ROLES:
            creds = secrets.redis(role)
            assert redis.Redis(port=port, username=creds.username, password=creds.password).ping()
        client.close()
        anonymous.close()
    finally:
        proc.terminate()
        proc.wait(10)


# ---- the launcher's Serve config -------------------------------------------------------------------------------------


def test_serve_config_replaces_only_the_redis_url_and_secrets_dir(capsys):
    assert main(["manifests", "serve-config", "--redis-url", "redis://10.0.0.5:6380/0"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    want = copy.deepcopy(m.load_serve_config())
    for app in want["applications"]:
        app["args"] = {**app["args"], "redis_url": "redis://10.0.0.5:6380/0", "secrets_dir": m.SECRETS_MOUNT}
    assert got == want
    assert main(["manifests", "serve-config", "--redis-url", "10.0.0.5:6380"]) == 2
    assert "invalid --redis-url" in capsys.readouterr().err


def test_serve_config_sets_any_field_checked_as_a_cloud_config(capsys):
    argv = ["manifests", "serve-config", "--redis-url", "redis://h:6380/0", "--set", "num_replicas=2"]
    argv += ["--set", "autoscaling.max_replicas=3", "--set", "gateway.replica_cpus=0.1", "--set", "large_model=/m"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "&id" not in text  # each application has args of its own, not YAML aliases
    for app in yaml.safe_load(text)["applications"]:
        args = app["args"]
        assert (args["num_replicas"], args["large_model"]) == (2, "/m")
        assert args["autoscaling"] == {"max_replicas": 3} and args["gateway"] == {"replica_cpus": 0.1}
    assert main(["manifests", "serve-config", "--redis-url", "redis://h:6380/0", "--set", "nokey"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err
    assert main(["manifests", "serve-config", "--redis-url", "redis://h:6380/0", "--set", "num_replicas=x"]) == 2
    assert "num_replicas" in capsys.readouterr().err


# ---- the Ray cluster launcher: configs/cluster/*.yaml ----------------------------------------------------------------


def _launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER[name].read_text())


def _commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    keys += ("head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k) or []]


AUTH_ENV = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={m.SECRETS_MOUNT}/{m.RAY_TOKEN_FILE}"


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_the_launcher_config_passes_rays_schema(name):
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _launcher(name)
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs on it, provider defaults filled in
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types", "head_node_type", "docker"):
        assert key in config, key
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert config[key], key
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for n, t in types.items() if n != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and all("CPU" in t["resources"] for t in types.values())


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_the_launcher_runs_the_project_image(name):
    config = _launcher(name)
    assert config["docker"]["image"] == m.IMAGE
    head = config["available_node_types"][config["head_node_type"]]
    assert "docker" not in head  # the head runs docker.image, the CPU build
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert {t["docker"]["worker_image"] for t in workers} == {m.gpu_image_of(m.IMAGE)}


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_every_ray_start_and_serve_deploy_runs_with_token_auth(name):
    config = _launcher(name)
    runs = [c for c in _commands(config) if re.search(r"\b(ray start|serve deploy)\b", c)]
    assert len(runs) == 3  # head start, serve deploy, worker start
    for command in runs:
        for part in re.split(r"&&|;", command):
            if re.search(r"\b(ray start|serve deploy)\b", part):
                assert AUTH_ENV in part, part
    options = " ".join(config["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in options
    assert f"-e RAY_AUTH_TOKEN_PATH={m.SECRETS_MOUNT}/{m.RAY_TOKEN_FILE}" in options
    assert f"-e COGENESIS_SECRETS_DIR={m.SECRETS_MOUNT}" in options


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_the_launcher_ports_and_secrets_agree_with_serve_yaml(name):
    config = _launcher(name)
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert f"--port={m.RAY_GCS_PORT}" in head and "--dashboard-host=0.0.0.0" in head
    assert f"--dashboard-port={m.DASHBOARD_PORT}" in head and f"http://127.0.0.1:{m.DASHBOARD_PORT}" in head
    assert f"--address=$RAY_HEAD_IP:{m.RAY_GCS_PORT}" in worker
    for text in (head, worker):
        assert f"--metrics-export-port={m.RAY_METRICS_PORT}" in text
        assert "6379" not in text
    # the bus: the same flags as the Kubernetes Deployment's, the port of configs/serve.yaml's redis_url
    redis_cmd = next(c for c in config["head_start_ray_commands"] if "redis-server " in c)
    redis_args = shlex.split(redis_cmd[redis_cmd.index("redis-server ") :])[1:]
    flags = list(m.REDIS_FLAGS)
    pairs = {redis_args[i]: redis_args[i + 1] for i in range(0, len(redis_args) - 1, 2)}
    assert {flags[i]: flags[i + 1] for i in range(0, len(flags), 2)}.items() <= pairs.items()
    assert pairs["--aclfile"] and pairs["--port"] == str(m.REDIS_PORT)
    assert f"):{m.REDIS_PORT}/0" in head
    # the secrets directory: mounted where configs/serve.yaml and every command read it
    assert list(config["file_mounts"]) == [_serve_yaml_args()["secrets_dir"]] == [m.SECRETS_MOUNT]
    mounted = {p for c in _commands(config) for p in re.findall(r"/var/run/secrets/[\w./-]+", c)}
    assert {p.rstrip("/") for p in mounted} <= {m.SECRETS_MOUNT, f"{m.SECRETS_MOUNT}/{m.RAY_TOKEN_FILE}"}


def _substituted(command: str, value: str = "10.0.0.1") -> str:
    """``command`` with each (balanced) ``$(...)`` replaced by ``value``."""
    out, i = [], 0
    while (start := command.find("$(", i)) >= 0:
        depth, j = 0, start + 1
        while True:
            depth += {"(": 1, ")": -1}.get(command[j], 0)
            if depth == 0:
                break
            j += 1
        out += [command[i:start], value]
        i = j + 1
    return "".join(out) + command[i:]


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_the_launcher_commands_parse(name):
    """Every command is valid bash, and every `cogenesis` call in it is one the CLI accepts."""
    parser = build_parser()
    for command in _commands(_launcher(name)):
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        plain = _substituted(command)
        for call in re.findall(r"(?:^|&&|;|\|\||\bdo\b)\s*(cogenesis\s[^&;|]*)", plain):
            parser.parse_args(shlex.split(call)[1:])  # SystemExit on an unknown command or flag
