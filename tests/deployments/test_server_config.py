"""configs/serve.yaml is a valid Serve config for this app."""

from pathlib import Path

import yaml

from cogenesis.core.config import CloudConfig, validate
from cogenesis.deployments.server import build_app

CONFIG = Path(__file__).parents[2] / "configs" / "serve.yaml"


def test_serve_yaml_builds_the_app():
    app = yaml.safe_load(CONFIG.read_text())["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("cogenesis.deployments.server", "build_app")
    cfg = validate(CloudConfig, app["args"], str(CONFIG))
    built = build_app(app["args"])
    assert cfg.num_replicas == 1
    assert type(built).__name__ == "Application"
