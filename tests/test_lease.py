"""The output lease (mspray.artifacts.lease) on local disk and on a real local S3 server (moto):
one holder at a time, bounded waits, stale leases taken over, heartbeats."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mspray import storage
from mspray.artifacts.lease import Lease, LeaseHeld, LeaseLost


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    """An output folder on local disk or on the S3 server."""
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/scores/day"


def _write_record(folder: str, gen: int, **fields) -> None:
    rec = {"owner": "crashed-host:4242:dead", "acquired_at": 0.0, "expires_at": 1.0}
    rec.update(ttl_s=600.0, purpose="an old run", released=False)
    rec.update(fields)
    storage.write_text(storage.join(folder, "_lease", f"{gen:012d}.json"), json.dumps(rec))


def _write_stale_record(folder: str, gen: int, **fields) -> None:
    """A record its holder stopped renewing: written with a 1 s TTL, then left alone for
    longer than that by the storage's clock (S3 times have a 1 s resolution)."""
    _write_record(folder, gen, ttl_s=1.0, **fields)
    time.sleep(2.2)


def _until(cond, what: str, limit_s: float = 60.0) -> None:
    """Wait for ``cond()`` (a liveness bound, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def test_second_run_is_refused_naming_the_holder_until_release(folder):
    first = Lease(folder, purpose="nightly scoring").acquire()
    with pytest.raises(LeaseHeld, match="--lease-wait") as info:
        Lease(folder).acquire()
    assert first.owner in str(info.value) and "nightly scoring" in str(info.value)
    assert info.value.holder.owner == first.owner
    with pytest.raises(LeaseHeld, match="Waited"):
        Lease(folder, wait_s=0.3, poll_s=0.1).acquire()  # bounded wait, then gives up
    first.release()
    gen, rec = Lease(folder).current()
    assert gen == 0 and rec.released
    with Lease(folder) as second:
        assert second.gen == 1
    assert storage.list_files(storage.join(folder, "_lease"), suffixes=None) == [
        storage.join(storage.normalize(folder), "_lease", f"{1:012d}.json")
    ]  # older records are cleaned up by the next holder


def test_a_waiting_run_starts_when_the_holder_releases(folder):
    first = Lease(folder).acquire()
    timer = threading.Timer(0.5, first.release)
    timer.start()
    waiter = Lease(folder, wait_s=120, poll_s=0.1).acquire()  # bounded by wait_s
    timer.join()
    assert waiter.gen == 1
    waiter.release()


def test_stale_lease_of_a_crashed_run_is_taken_over(folder):
    _write_stale_record(folder, 0)  # its holder stopped renewing
    with Lease(folder, purpose="rerun") as lease:
        gen, rec = lease.current()
        assert gen == 1 and rec.owner == lease.owner and not rec.released
    # a live record of another run is not taken over
    _write_record(folder, 2)
    with pytest.raises(LeaseHeld, match="crashed-host:4242"):
        Lease(folder).acquire()


@pytest.mark.parametrize("stale", [False, True])
def test_racing_runs_get_exactly_one_lease(folder, stale):
    if stale:
        _write_stale_record(folder, 0)
    barrier = threading.Barrier(6)

    def attempt(_: int) -> Lease | None:
        barrier.wait()
        try:
            return Lease(folder, ttl_s=600).acquire()
        except LeaseHeld:
            return None

    with ThreadPoolExecutor(6) as pool:
        got = [x for x in pool.map(attempt, range(6)) if x is not None]
    assert len(got) == 1
    assert Lease(folder).current()[1].owner == got[0].owner
    got[0].release()


def test_heartbeat_renews_and_notices_a_takeover(folder):
    lease = Lease(folder, ttl_s=0.6).acquire()  # renewed every 0.2 s
    first_expiry = lease.current()[1].expires_at
    _until(lambda: lease.current()[1].expires_at > first_expiry, "a renewal")
    lease.check()  # still ours
    # another run presumed it dead and took generation 1
    rec = {"owner": "other:1:x", "acquired_at": time.time(), "expires_at": time.time() + 600,
           "ttl_s": 600.0, "purpose": "", "released": False}  # fmt: skip
    assert storage.create_exclusive(
        storage.join(folder, "_lease", f"{1:012d}.json"), json.dumps(rec).encode()
    )
    _until(lambda: lease.lost, "the takeover being noticed")
    with pytest.raises(LeaseLost, match="other:1:x"):
        lease.check()
    lease.release()  # does not touch the new holder's record
    assert Lease(folder).current()[1].owner == "other:1:x"


def test_bad_arguments():
    with pytest.raises(ValueError, match="TTL"):
        Lease("/tmp/x", ttl_s=0)
    with pytest.raises(ValueError, match="wait"):
        Lease("/tmp/x", wait_s=-1)


def test_expiry_goes_by_the_storage_clock_not_the_machines_clocks(folder):
    """Two clocks: a holder whose clock runs an hour behind writes records that look long
    expired to a machine whose clock runs an hour ahead; neither decides expiry. A crashed
    holder whose clock ran ahead is still taken over once its TTL has passed."""
    hour = 3600.0
    holder = Lease(folder, ttl_s=600, clock=lambda: time.time() - hour).acquire()
    try:
        assert holder.current()[1].expires_at < time.time()  # "expired" by wall clocks
        with pytest.raises(LeaseHeld, match=holder.owner):
            Lease(folder, clock=lambda: time.time() + hour).acquire()
        holder.assert_held()
    finally:
        holder.release()
    _write_stale_record(folder, 2, expires_at=time.time() + 10 * hour)  # clock far ahead
    with Lease(folder, clock=lambda: time.time() - hour) as taker:
        assert taker.gen == 3


def test_the_fence_stops_writers_of_a_taken_over_lease(folder):
    """Workers check the fence before each write: once another run took the lease over,
    even a worker whose driver has not noticed yet (no heartbeat since) stops."""
    import pickle

    lease = Lease(folder, ttl_s=600).acquire()  # next heartbeat in 200 s
    fence = pickle.loads(pickle.dumps(lease.fence()))  # as shipped to an actor
    fence.assert_held()
    _write_record(folder, lease.gen + 1, owner="other:2:y")  # the takeover
    assert not lease.lost  # the driver does not know yet
    with pytest.raises(LeaseLost, match="no longer current"):
        fence.assert_held()
    with pytest.raises(LeaseLost):
        lease.assert_held()
    lease.release()
