"""Settings of multi-model serving and scoring, without Ray: ``--bundle
[NAME=]URI`` on the command line, model-name validation, which model a request gets, and
the bounded ``reason`` of scoring error rows."""

from __future__ import annotations

import pytest

from mspray.cli import build_parser
from mspray.cli.flags import serve_config_from_args, split_named_bundle
from mspray.config import ConfigError, ServeConfig, validate
from mspray.ray.metrics import error_reason
from mspray.ray.serve.slots import NoModel, pick_model


def _serve(*argv: str) -> ServeConfig:
    return serve_config_from_args(build_parser().parse_args(["serve", *argv]))


def test_bundle_flag_named_repeated_and_bare():
    cfg = _serve("--bundle", "screw=s3://m/screw", "--bundle", "nut=/m/nut")
    assert cfg.models == {"screw": "s3://m/screw", "nut": "/m/nut"} and cfg.bundle_uri is None
    assert cfg.user_config()["models"] == cfg.models  # reloadable: goes to user_config
    bare = _serve("--bundle", "s3://m/bottle")
    assert bare.bundle_uri == "s3://m/bottle" and bare.named_models() == {
        "default": bare.bundle_uri
    }
    both = _serve("--bundle", "/m/a", "--bundle", "b=/m/b", "--max-num-models-per-replica", "1")
    assert both.named_models() == {"b": "/m/b", "default": "/m/a"}
    assert both.max_num_models_per_replica == 1
    with pytest.raises(SystemExit):
        _serve("--bundle", "/m/a", "--bundle", "/m/b")  # two unnamed bundles
    with pytest.raises(SystemExit):
        _serve("--bundle", "a=/m/a", "--bundle", "a=/m/b")  # a name twice
    with pytest.raises(ConfigError, match="--bundle"):
        _serve()


def test_a_uri_with_equals_sign_stays_a_bare_bundle():
    assert split_named_bundle("screw=s3://b/k") == ("screw", "s3://b/k")
    assert split_named_bundle("s3://b/run=3") == (None, "s3://b/run=3")
    assert split_named_bundle("/models/v=2") == (None, "/models/v=2")


def test_model_names_are_header_safe_and_default_is_reserved():
    with pytest.raises(ConfigError, match="models"):
        validate(ServeConfig, {"models": {"my model": "/m"}})
    with pytest.raises(ConfigError, match="default"):
        validate(ServeConfig, {"bundle_uri": "/a", "models": {"default": "/b"}})


def test_pick_model():
    one, two = {"a": "/a"}, {"a": "/a", "b": "/b"}
    assert pick_model(one, None, "") == "a"  # the single-bundle form
    assert pick_model(two, "b", "") == "b" and pick_model(two, None, "b") == "b"
    assert pick_model({"default": "/d", "b": "/b"}, None, None) == "default"
    for models, query, header, status in (
        (two, None, "", 400),  # several, none named
        (two, "c", "", 404),
        (two, None, "c", 404),
        (two, "a", "b", 400),  # query and header disagree
    ):
        with pytest.raises(NoModel) as e:
            pick_model(models, query, header)
        assert e.value.status == status and e.value.models == ["a", "b"]


def test_score_error_reasons():
    assert error_reason("/x/a.png: no such file") == "missing"
    assert error_reason("/x/a.png: file is over the limit of 10 bytes") == "too_large"
    assert error_reason("/x/bolt/a.png: matches no model (names 'bolt'); models: a") == ("no_model")
    assert error_reason("/x/a.png: cannot identify image file") == "decode"
    assert error_reason("something else") == "other"
