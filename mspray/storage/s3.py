"""S3 and S3-compatible stores (``s3://bucket/key``).

Configured only from environment variables (the standard AWS ones plus
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``), so a Ray worker process rebuilds the same
filesystem from its inherited environment. Reads and writes go through pyarrow; boto3 is
used only for what pyarrow cannot do (conditional writes).
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from mspray.storage.base import Backend

#: Attempts per S3 request. Throttling (503 SlowDown) is retried by the SDKs themselves:
#: pyarrow's default retry strategy (exponential backoff) for reads and writes,
#: botocore's adaptive mode (the same, plus a client-side send rate that drops on
#: throttling) for the conditional writes. Enough attempts to ride out a burst of SlowDown
#: when many writers share a prefix, with no retry loop of our own.
S3_ATTEMPTS = 8


def _s3_config() -> tuple:
    """Everything that distinguishes one S3 filesystem from another, read from the env."""
    env = os.environ.get
    endpoint = env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or ""
    region = env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1"
    return (
        endpoint,
        region,
        env("AWS_ACCESS_KEY_ID"),
        env("AWS_SECRET_ACCESS_KEY"),
        env("AWS_SESSION_TOKEN"),
    )


class S3Backend(Backend):
    """``s3://`` through pyarrow's S3 filesystem, one per distinct environment."""

    scheme = "s3"
    local = False

    def __init__(self) -> None:
        self._fs: dict[tuple, pafs.S3FileSystem] = {}
        self._boto: dict[tuple, object] = {}
        self._lock = threading.Lock()

    def locate(self, uri: str) -> tuple[pafs.FileSystem, str]:
        path = uri[5:].strip("/")
        if not path:
            raise ValueError(f"S3 URI without a bucket: {uri}")
        return self.filesystem(), path

    def uri_of(self, ref: str, path: str) -> str:
        return f"s3://{path}"

    def filesystem(self) -> pafs.S3FileSystem:
        """The S3 filesystem of the current environment (cached per distinct one)."""
        key = _s3_config()
        with self._lock:
            fs = self._fs.get(key)
            if fs is None:
                endpoint, region, access, secret, token = key
                kwargs: dict = {"region": region}
                if endpoint:
                    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
                    kwargs["scheme"] = parts.scheme or "https"
                    kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
                if access and secret:
                    kwargs.update(access_key=access, secret_key=secret, session_token=token)
                # else: pyarrow's own chain (config files, instance metadata) finds credentials
                # Throttling, timeouts and 5xx are retried with backoff by the AWS SDK itself:
                # the default strategy (exponential from 25 ms) has no retry quota, which the
                # standard one spends within seconds when every writer of a prefix is
                # throttled at once, and then fails requests without retrying them
                kwargs["retry_strategy"] = pafs.AwsDefaultS3RetryStrategy(max_attempts=S3_ATTEMPTS)
                fs = self._fs[key] = pafs.S3FileSystem(**kwargs)
        return fs

    def client(self):  # -> botocore S3 client
        """A boto3 S3 client from the same environment as :meth:`filesystem`."""
        key = _s3_config()
        with self._lock:
            client = self._boto.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                endpoint, region, access, secret, token = key
                if endpoint and "://" not in endpoint:
                    endpoint = f"https://{endpoint}"
                client = self._boto[key] = boto3.client(
                    "s3",
                    endpoint_url=endpoint or None,
                    region_name=region,
                    aws_access_key_id=access,
                    aws_secret_access_key=secret,
                    aws_session_token=token,
                    config=Config(retries={"mode": "adaptive", "max_attempts": S3_ATTEMPTS}),
                )
        return client

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``, answered with 412 when the key exists).

        The store must honour ``If-None-Match`` on PUT (AWS S3 does since 2024); one that
        ignores it gives no exclusion.
        """
        from botocore.exceptions import ClientError

        bucket, _, key = self.locate(uri)[1].partition("/")
        try:
            self.client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            err = e.response.get("Error", {})
            # 412: the key exists; 409: another conditional write to it is in flight
            if err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise OSError(f"conditional write of {uri} failed: {e}") from e
        return True

    def replace_if(self, uri: str, data: bytes, expected: bytes | None) -> bool:
        """A GET, then a PUT conditional on the ETag read (``If-Match``), or on there being
        no object (``If-None-Match: *``)."""
        from botocore.exceptions import ClientError

        bucket, _, key = self.locate(uri)[1].partition("/")
        cond: dict[str, str] = {"IfNoneMatch": "*"}
        try:
            got = self.client().get_object(Bucket=bucket, Key=key)
            if got["Body"].read() != expected:
                return False
            cond = {"IfMatch": got["ETag"]}
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise OSError(f"reading {uri} failed: {e}") from e
            if expected is not None:
                return False
        try:
            self.client().put_object(Bucket=bucket, Key=key, Body=data, **cond)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            # 412: changed since read; 409: another conditional write in flight; 404: gone
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            raise OSError(f"conditional write of {uri} failed: {e}") from e
        return True

    def write_bytes(self, uri: str, data: bytes) -> None:
        """One PUT: no folder marker first (S3 has no folders; a marker per heatmap
        folder would double the PUTs on a throttled prefix)."""
        fs, path = self.locate(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)

    def makedirs(self, uri: str) -> None:
        # S3 has no folders: only check that the bucket exists (no marker objects, which
        # other tools would list as empty files)
        fs, path = self.locate(uri)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such bucket: s3://{bucket} (for {uri})")
