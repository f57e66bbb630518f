"""S3 throttling (503 SlowDown) is ridden out by the S3 clients' own retry strategies:
pyarrow's for reads and writes, botocore's adaptive mode for the conditional writes (the
lease, bundle pointers). A burst of SlowDown longer than the old 5 attempts still gets
through, with no retry loop of mspray's. Needs no Ray; it lives beside the proxy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from faulty_s3 import FaultyS3Proxy

from mspray import storage
from mspray.storage import S3_ATTEMPTS

#: consecutive SlowDown replies per key: as many as the old 5 attempts, which gave up here
#: (botocore backs off about 2**attempt s each, so this takes a while)
BURST = 5


@pytest.mark.slow
def test_a_burst_of_slowdown_on_writes_is_retried_by_the_s3_clients(
    s3_server, s3_bucket, monkeypatch
):
    assert BURST < S3_ATTEMPTS

    def throttle_puts(method: str, key: str, n: int) -> str | None:
        return "slowdown" if method == "PUT" and n <= BURST else None

    with FaultyS3Proxy(s3_server, throttle_puts) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # new clients, via the proxy
        with ThreadPoolExecutor(2) as pool:  # the two backoffs at once
            wrote = pool.submit(storage.write_bytes, f"{s3_bucket}/a.png", b"panel")  # pyarrow
            created = pool.submit(storage.create_exclusive, f"{s3_bucket}/0.json", b"{}")  # boto3
            wrote.result()
            assert created.result()
        assert proxy.injected["slowdown"] == 2 * BURST
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.read_bytes(f"{s3_bucket}/a.png") == b"panel"
    assert storage.read_bytes(f"{s3_bucket}/0.json") == b"{}"
    assert storage.backend(s3_bucket).client().meta.config.retries["mode"] == "adaptive"
