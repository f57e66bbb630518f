"""Typed run objects (mspray/config/runs.py): their flags come from their fields, and the
rules between fields hold for the CLI and for library callers alike."""

from __future__ import annotations

import datetime as dt

import pytest

from mspray.cli import build_parser, main
from mspray.cli.flags import flag_values
from mspray.config import ConfigError, validate
from mspray.config.runs import BankRun, CalibrateRun, ScoreRun, TrainRun


def _run(model, argv: list[str], prefix: str):
    return validate(model, flag_values(build_parser().parse_args(argv), prefix))


def test_score_flags_fill_a_score_run():
    argv = ["score", "--bundle", "a=s3://m/a", "--bundle", "b=s3://m/b", "--input", "in/{date}",
            "--output", "out", "--route", "in/{model}/**", "--date", "2024-03-07"]  # fmt: skip
    argv += ["--part-size", "8", "--lease-wait", "2", "--dry-run", "--modified-since", "last-run"]
    run = _run(ScoreRun, argv, "score")
    assert run.models == {"a": "s3://m/a", "b": "s3://m/b"} and run.bundle_uri is None
    assert (run.part_size, run.lease_wait, run.dry_run, run.maps) == (8, 2.0, True, False)
    assert run.date == dt.date(2024, 3, 7) and run.modified_since == "last-run"
    assert run.dated().input == "in/2024-03-07" and run.dated().route == "in/{model}/**"
    one = _run(ScoreRun, ["score", "--bundle", "b", "--input", "i", "--output", "o"], "score")
    assert one.bundles() == "b" and one.lease_ttl == 300.0  # the flag's shown default


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "--bundle is required"),
        ({"bundle_uri": "x", "models": {"a": "y"}}, "name every bundle"),
        ({"bundle": {"a": "y"}, "manifest": "m", "input_manifest": "n"}, "either --manifest"),
        ({"bundle": "x", "route": "{model}/**"}, "named bundles"),
        ({"bundle": "x", "part_size": 0}, "part_size"),
    ],
)
def test_score_run_rules(fields, message):
    with pytest.raises(ConfigError, match=message):
        validate(ScoreRun, {"input": "i", "output": "o", **fields})


def test_a_missing_required_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["score", "--bundle", "b", "--output", "o"])
    assert e.value.code == 2 and "--input" in capsys.readouterr().err


def test_calibrate_takes_exactly_one_promise(capsys):
    base = ["calibrate", "--bundle", "b", "--input", "i"]
    run = _run(CalibrateRun, [*base, "--expected-anomaly-rate", "0.1"], "cal")
    assert (run.normal, run.expected_anomaly_rate, run.device) == (False, 0.1, "auto")
    with pytest.raises(SystemExit):  # argparse's mutually exclusive group
        build_parser().parse_args([*base, "--normal", "--expected-anomaly-rate", "0.1"])
    with pytest.raises(ValueError, match="exactly one"):
        CalibrateRun(bundle="b", input="i")  # a library caller gets the same rule


def test_train_and_build_bank_runs():
    run = _run(TrainRun, ["train", "--data", "folder:x", "--out", "o", "--no-banks"], "run")
    assert (run.data, run.out, run.banks, run.run_name) == ("folder:x", "o", False, None)
    argv = ["build-bank", "--bundle", "b", "--data", "folder:x", "--append", "--no-calibrate"]
    bank = _run(BankRun, argv, "run")
    assert (bank.append, bank.append_all, bank.calibrate) == (True, False, False)


def test_append_all_without_append_exits_2(capsys):
    argv = ["build-bank", "--bundle", "b", "--data", "folder:x", "--append-all"]
    assert main(argv) == 2
    assert "--append-all needs --append" in capsys.readouterr().err
