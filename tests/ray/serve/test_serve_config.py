"""serve_config.yaml is accepted by Ray's own Serve config schema and by ServeConfig, and
builds our app; the builder's settings become the deployment's Serve options."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from mspray.config import ConfigError, ServeConfig, validate
from mspray.ray.serve import DEPLOYMENT_NAME, build_app, deployment_options
from mspray.ray.serve.slots import apply_user_config

CONFIG = Path(__file__).resolve().parents[3] / "serve_config.yaml"


@pytest.fixture(scope="module")
def config() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))


def test_serve_config_validates_against_ray_schema_and_serve_config(config):
    (app,) = config.applications
    assert app.import_path == "mspray.ray.serve:build_app"
    (dep,) = app.deployments
    assert dep.name == DEPLOYMENT_NAME
    # every setting is a ServeConfig field: args all of them, user_config the reloadable
    assert set(dep.user_config) <= set(ServeConfig.RELOADABLE)
    cfg = apply_user_config(ServeConfig.model_validate(app.args), dep.user_config)
    assert cfg.bundle_uri.startswith("s3://")
    assert cfg.max_replicas is not None and cfg.max_replicas >= cfg.replicas >= 1
    assert cfg.max_ongoing_requests >= cfg.max_batch_size


def test_import_path_builds_the_application(config):
    """What Serve's controller does with the config: import the builder, call it with args."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    (app,) = config.applications
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    assert isinstance(built, Application)


def test_settings_become_deployment_options():
    fixed = deployment_options(ServeConfig(bundle="s3://b/m", replicas=2, num_gpus=1))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert fixed["user_config"]["bundle_uri"] == "s3://b/m"
    assert set(fixed["user_config"]) <= set(ServeConfig.RELOADABLE)
    auto = deployment_options(ServeConfig(replicas=2, max_replicas=5, max_ongoing_requests=80))
    assert "num_replicas" not in auto and auto["max_ongoing_requests"] == 80
    assert auto["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 5,
        "target_ongoing_requests": 16,
    }
    with pytest.raises(ConfigError, match="max_replicas"):
        deployment_options(validate(ServeConfig, {"replicas": 3, "max_replicas": 2}))
    assert auto["max_queued_requests"] == ServeConfig().max_queued_requests > 0


def test_build_app_validates_its_args():
    assert isinstance(build_app({"bundle": "s3://b/m", "replicas": 2}), Application)
    assert isinstance(build_app(ServeConfig(bundle_uri="x")), Application)
    with pytest.raises(ConfigError, match="max_batch_size"):
        build_app({"bundle": "x", "max_batch_size": 32, "max_ongoing_requests": 8})
    with pytest.raises(ConfigError, match="no_such_option"):
        build_app({"bundle": "x", "no_such_option": 1})
    with pytest.raises(ConfigError, match="max_batch_size"):
        build_app({"max_batch_size": 0})


def test_user_config_takes_only_reloadable_settings():
    args = ServeConfig(bundle="a", replicas=2, max_batch_size=8)
    cfg = apply_user_config(args, {"bundle_uri": "b", "max_batch_size": 4})
    assert (cfg.bundle_uri, cfg.max_batch_size, cfg.replicas) == ("b", 4, 2)
    assert apply_user_config(args, None) == args
    with pytest.raises(ConfigError, match="replicas"):
        apply_user_config(args, {"replicas": 3})
    with pytest.raises(ConfigError, match="batch_wait_timeout_s"):
        apply_user_config(args, {"batch_wait_timeout_s": -1})
    with pytest.raises(ConfigError, match="max_batch_size"):  # above max_ongoing_requests
        apply_user_config(args, {"max_batch_size": 1000})
