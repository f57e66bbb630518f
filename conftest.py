"""Repository-wide pytest fixtures: one local Ray for the whole test session.

Ray's start-up costs seconds, so every Ray test shares one session-scoped instance. It is
started with more logical CPUs than the machine has cores: a Ray Train run needs one CPU for
its controller plus one per worker, and Serve/Data actors need theirs, which two real cores
could never satisfy at once. The local S3 server starts first, so Ray's worker processes
inherit its AWS_* environment variables.
"""

from __future__ import annotations

import os

import pytest

RAY_TEST_CPUS = 8


@pytest.fixture(scope="session")
def ray_local(s3_server, tmp_path_factory):
    """A local Ray (started once per session); yields the ``ray`` module."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_TEST_CPUS,
            include_dashboard=False,
            log_to_driver=True,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
