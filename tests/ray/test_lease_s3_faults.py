"""The lease on S3 when the network loses a response: a conditional PUT (``If-None-Match:
*``) that took effect but whose reply never arrived is retried by the S3 client, which then
gets 412 for its own write. The run must see that the record is its own and hold the lease,
not report itself as another holder and exit. Needs no Ray; it lives here beside the
fault-injecting proxy (``faulty_s3.py``)."""

from __future__ import annotations

import pytest
from faulty_s3 import FaultyS3Proxy

from mspray import storage
from mspray.artifacts.lease import Lease, LeaseHeld

FIRST = "_lease/000000000000.json"


def test_a_lost_reply_to_the_conditional_put_still_gives_the_lease(
    s3_server, s3_bucket, monkeypatch
):
    folder = f"{s3_bucket}/scores/day"

    def drop_first_put(method: str, key: str, n: int) -> str | None:
        return "drop" if method == "PUT" and key.endswith(FIRST) and n == 1 else None

    with FaultyS3Proxy(s3_server, drop_first_put) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # a new client, via the proxy
        lease = Lease(folder, ttl_s=600).acquire()
        try:
            assert proxy.injected["drop"] == 1
            assert proxy.counts[("PUT", f"/{s3_bucket[5:]}/scores/day/{FIRST}")] == 2  # retried
            assert lease.gen == 0 and lease.current()[1].owner == lease.owner
            lease.assert_held()
        finally:
            lease.release()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    # and a second run still finds the lease free after the release, held while it runs
    with Lease(folder) as again:
        assert again.gen == 1
        with pytest.raises(LeaseHeld):
            Lease(folder).acquire()
    assert storage.exists(storage.join(folder, "_lease"))
