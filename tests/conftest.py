"""Shared fixtures for the test suite (the Ray fixture lives in the repository-root conftest).

- ``s3_server`` (session): a real S3 server (moto's server mode) on 127.0.0.1 and a free
  port, with the AWS_* environment pointing at it, so every S3 client in the process (and
  in Ray workers started afterwards, which inherit the environment) talks to it.
- ``s3_bucket`` (function): a fresh, empty bucket on that server, as ``s3://<name>``.
- ``synthetic_root`` (session): a small synthetic MVTec-layout dataset on local disk
  (category ``synthetic``, 64×64 images) as a ``pathlib.Path`` to its root.
- ``quiet_run`` (autouse): every test runs in ``RunContext(progress=False)`` (no progress
  bars); a test that wants bars or an address enters ``use_run(...)`` itself.

Add new fixtures below with a one-line docstring each.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

SYNTHETIC_SIZE = 64


def _fix_moto_complete_multipart() -> None:
    """moto 5.2.1 names the CompleteMultipartUpload result ``...Response`` instead of
    ``CompleteMultipartUploadResult`` (getmoto/moto#10055, fixed in 5.2.2); pyarrow's S3
    client rejects that, so every pyarrow upload fails. Rename the root tag on the way out;
    a no-op on fixed versions."""
    from moto.s3.responses import S3Response

    original = S3Response.serialized
    if getattr(original, "_mspray_fixed", False):
        return

    def serialized(self, result):  # type: ignore[no-untyped-def]
        status, headers, body = original(self, result)
        if self.data.get("Action") == "CompleteMultipartUpload" and isinstance(body, str):
            body = body.replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult")
        return status, headers, body

    serialized._mspray_fixed = True  # type: ignore[attr-defined]
    S3Response.serialized = serialized


@pytest.fixture(autouse=True)
def quiet_run():
    """The run context of every test: no progress bars (see :mod:`mspray.config.run`)."""
    from mspray.config.run import RunContext, use_run

    with use_run(RunContext(progress=False)):
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A local moto S3 server for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    _fix_moto_complete_multipart()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # 0: free port
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never wait on instance metadata
        for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields ``s3://<bucket>``."""
    import boto3

    name = f"mspray-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny detector config (:func:`mspray.config.tiny_config`); vary it with
    ``tiny_cfg.replace(...)``."""
    from mspray.config import tiny_config

    return tiny_config()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic texture dataset: root/synthetic/{train,test,ground_truth}, 64 px."""
    from mspray.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(
        str(root),
        category="synthetic",
        n_train=12,
        n_test_good=4,
        n_test_defect=6,
        size=SYNTHETIC_SIZE,
        seed=0,
    )
    return root
