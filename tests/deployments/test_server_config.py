"""configs/serve.yaml is a valid Serve config: each app's builder, called the way Serve calls it, builds it."""

import importlib
from pathlib import Path

import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from cogenesis.core.config import CloudConfig, validate

CONFIG = Path(__file__).parents[2] / "configs" / "serve.yaml"


def _builder(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_serve_yaml_builds_the_cloud_and_the_gateway(monkeypatch):
    monkeypatch.setenv("COGENESIS_CLUSTER_KEY", "ab" * 32)  # the gateway checks there is a key at build time
    apps = {app["name"]: app for app in yaml.safe_load(CONFIG.read_text())["applications"]}
    assert set(apps) == {"cogenesis", "gateway"}
    assert (apps["cogenesis"]["route_prefix"], apps["gateway"]["route_prefix"]) == ("/cloud", "/")
    for app in apps.values():
        cfg = validate(CloudConfig, app["args"], str(CONFIG))
        assert cfg.num_replicas == 1 and cfg.secrets_dir == "/var/run/secrets/cogenesis"
        built = call_user_app_builder_with_args_if_necessary(_builder(app["import_path"]), app["args"])
        assert type(built).__name__ == "Application"
