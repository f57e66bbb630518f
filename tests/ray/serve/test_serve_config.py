"""serve_config.yaml is accepted by Ray's own Serve config schema and builds our app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from mspray.ray.serve import DEPLOYMENT_NAME, AppArgs, ServeSettings, build_app

CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


@pytest.fixture(scope="module")
def config() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))


def test_serve_config_validates_against_ray_schema(config):
    (app,) = config.applications
    assert app.import_path == "mspray.ray.serve:build_app"
    (dep,) = app.deployments
    assert dep.name == DEPLOYMENT_NAME
    auto = dep.autoscaling_config
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"]
    assert dep.ray_actor_options.num_gpus is not None
    settings = ServeSettings.model_validate(dep.user_config)
    assert settings.bundle_uri.startswith("s3://")
    assert dep.max_ongoing_requests >= settings.max_batch_size


def test_import_path_builds_the_application(config):
    """What Serve's controller does with the config: import the builder, call it with args."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    (app,) = config.applications
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert isinstance(built, Application)


def test_build_app_options():
    app = build_app({"bundle": "s3://b/m", "num_replicas": 2, "num_gpus": 1})
    assert isinstance(app, Application)
    assert AppArgs(bundle="x").user_config()["bundle_uri"] == "x"
    with pytest.raises(ValueError, match="max_batch_size"):
        build_app({"bundle": "x", "max_batch_size": 32, "max_ongoing_requests": 8})
    with pytest.raises(ValueError, match="no_such_option"):
        build_app({"bundle": "x", "no_such_option": 1})
    with pytest.raises(ValueError, match="unknown_key"):
        ServeSettings.model_validate({"bundle_uri": "x", "unknown_key": 1})
