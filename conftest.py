"""Repository-wide pytest fixtures: one local Ray for the whole test session.

Ray's start-up costs seconds, so every Ray test shares one session-scoped instance. It is
started with more logical CPUs than the machine has cores: a Ray Train run needs one CPU for
its controller plus one per worker, and Serve/Data actors need theirs, which two real cores
could never satisfy at once. The local S3 server starts first, so Ray's worker processes
inherit its AWS_* environment variables.

A test that needs a Ray of its own (the simulated multi-node clusters of
``tests/ray/cluster.py``) takes ``ray_exclusive``: only one Ray can be connected per
process, so it disconnects (and so stops) the session's local Ray. Those tests run last
(the simulated cluster's last of all), so the local Ray is stopped once, not restarted
after each of them; it is started again only if a later test still asks for it (what ran
on it, Serve applications and named actors, does not survive that).
"""

from __future__ import annotations

import os

import pytest

RAY_TEST_CPUS = 8


def _init_local_ray(temp_dir: str) -> None:
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(
        address="local",  # a new Ray, never another process's cluster found in /tmp/ray
        num_cpus=RAY_TEST_CPUS,
        include_dashboard=False,
        log_to_driver=True,
        _temp_dir=temp_dir,
    )


@pytest.fixture(scope="session")
def _ray_temp_dir(tmp_path_factory) -> str:
    """Where the session's local Ray keeps its logs and sockets."""
    return str(tmp_path_factory.mktemp("ray"))


@pytest.fixture(scope="session")
def ray_local(s3_server, _ray_temp_dir):
    """A local Ray (started once per session); yields the ``ray`` module."""
    import ray

    if not ray.is_initialized():
        _init_local_ray(_ray_temp_dir)
    yield ray
    if ray.is_initialized():  # serve.shutdown() would start a Ray to connect to
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
    ray.shutdown()


@pytest.fixture
def ray_exclusive(request, s3_server, _ray_temp_dir):
    """No Ray connected in this process during the test (for a test that starts its own
    cluster); a session Ray that was up before is started again afterwards if a later test
    of the session takes ``ray_local``."""
    import ray

    was_up = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    items = request.session.items
    later = items[items.index(request.node) + 1 :] if request.node in items else items
    if was_up and any("ray_local" in item.fixturenames for item in later):
        _init_local_ray(_ray_temp_dir)


def _exclusive_rank(item: pytest.Item) -> int:
    names = getattr(item, "fixturenames", ())
    return 2 if "_sim_nodes" in names else 1 if "ray_exclusive" in names else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that take ``ray_exclusive`` run after all others (those on the session's
    simulated cluster last), each group in collection order."""
    items.sort(key=_exclusive_rank)  # stable
