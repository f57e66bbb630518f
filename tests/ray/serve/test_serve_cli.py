"""`mspray serve`: help text and the mapping of options to the app builder's arguments."""

from __future__ import annotations

import pytest

from mspray.cli import build_parser
from mspray.ray.serve.run import app_args


def test_help_lists_routes_and_options(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--bundle",
        "--port",
        "--host",
        "--replicas",
        "--max-batch-size",
        "/v1/predict",
        "/healthz",
        "/v1/model",
        "Ctrl-C",
    ):
        assert text in out


def test_options_become_builder_args():
    args = build_parser().parse_args(
        [
            "serve",
            "--bundle",
            "s3://m/b",
            "--port",
            "9000",
            "--max-batch-size",
            "8",
            "--batch-wait-ms",
            "5",
            "--num-gpus",
            "1",
        ]
    )
    a = app_args(args)
    assert (a.bundle, a.max_batch_size, a.batch_wait_timeout_s) == ("s3://m/b", 8, 0.005)
    assert a.num_replicas == 1 and a.num_gpus == 1 and args.port == 9000
    auto = app_args(
        build_parser().parse_args(
            ["serve", "--bundle", "b", "--replicas", "2", "--max-replicas", "5"]
        )
    )
    assert auto.num_replicas is None and (auto.min_replicas, auto.max_replicas) == (2, 5)
