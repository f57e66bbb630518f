"""The run context (mspray/config/run.py): set once by an entry point, read by the library."""

from __future__ import annotations

import threading

from mspray.cli import main
from mspray.config.run import RunContext, current_run, progress_bar, use_run


def test_use_run_applies_changes_and_restores_the_outer_context():
    outer = current_run()  # the suite's quiet context (tests/conftest.py)
    assert outer == RunContext(progress=False)
    with use_run(address="auto") as ctx:
        assert ctx == current_run() == RunContext(progress=False, address="auto")
        with use_run(RunContext(), progress=True):
            assert current_run() == RunContext(progress=True)
        assert current_run().address == "auto"
    assert current_run() == outer


def test_progress_bars_follow_the_context():
    with use_run(progress=False):
        assert progress_bar(range(3)).disable
    with use_run(progress=True):
        assert not progress_bar(range(3)).disable
        assert progress_bar(range(3), disable=True).disable  # e.g. ranks other than 0


def test_a_thread_started_in_a_run_sees_only_the_default():
    # contextvars are per thread: code that fans out to threads or processes passes the
    # context on explicitly (as the Ray layer does for its workers)
    seen = []
    with use_run(address="auto"):
        t = threading.Thread(target=lambda: seen.append(current_run()))
        t.start()
        t.join()
    assert seen == [RunContext()]


def test_the_cli_sets_quiet_and_address_once(monkeypatch):
    # the command itself is replaced by a probe of what it would run in
    import mspray.cli.train as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "cmd_build_bank", lambda args: seen.append(current_run()))
    main(["build-bank", "--bundle", "b", "--data", "folder:x", "--address", "auto", "-q"])
    assert seen == [RunContext(progress=False, address="auto")]
