"""An exclusive, expiring lease on a folder (local or ``s3://``), built on exclusive create.

Used so that two jobs never work on one output at once (``mspray score``). The lease is a
sequence of small JSON records ``FOLDER/_lease/<generation>.json``; the record with the
highest generation is the current state:

- *acquire*: read the current record; if there is none, or it is released, or it expired
  (its holder stopped renewing it: crashed, killed, partitioned), create generation + 1
  with :func:`mspray.storage.create_exclusive` (S3 ``If-None-Match: *``; local hard link).
  Of several runs racing for the same generation exactly one creates it; the others see
  the new record and wait or give up. A live record makes the caller wait up to
  ``wait_s`` and then raise :class:`LeaseHeld` naming the holder. Each record carries a
  random token: a client that retries a conditional PUT whose response was lost gets
  412 for its own write, finds its token in the record and holds the lease.
- *heartbeat*: the holder rewrites its own record with a new expiry every ``ttl_s / 3``
  seconds from a daemon thread. If a higher generation appeared (it was presumed dead and
  taken over) or it could not renew before its expiry, the lease is *lost*:
  :meth:`Lease.check` raises :class:`LeaseLost` so the job stops instead of running on
  alongside the new holder.
- *release*: the holder marks its record released; the next run starts at once.
- *fencing*: :meth:`Lease.fence` gives a small picklable :class:`LeaseFence` that workers
  on other machines check (:meth:`LeaseFence.assert_held`, one listing) right before each
  write, so a run that was taken over stops writing within one write, not a heartbeat.

Only the holder ever writes its own generation, so the sequence needs no compare-and-swap.
One clock decides expiry, the storage's: a record has expired when the storage's time now
(the modification time of a probe object written for the purpose) is more than its TTL past
the record's own modification time (S3 ``LastModified``, file mtime). No machine's wall clock
is compared with another's; holders track their own renewals on a monotonic clock. The S3
store must honour ``If-None-Match`` on PUT (AWS S3 does).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from mspray import storage

log = logging.getLogger(__name__)

LEASE_DIR = "_lease"
#: A crashed holder's lease is taken over this long after its last renewal.
DEFAULT_TTL_S = 300.0


class LeaseHeld(RuntimeError):
    """Another live holder has the lease (after waiting as long as allowed)."""

    def __init__(self, message: str, holder: LeaseRecord) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """The lease was taken over by another run, or could not be renewed in time."""


@dataclass
class LeaseRecord:
    """One generation of the lease: who holds it, and (by the holder's clock, for people
    reading it) since and until when. Expiry itself goes by the storage's clock."""

    owner: str
    acquired_at: float
    expires_at: float
    ttl_s: float
    purpose: str = ""
    released: bool = False
    #: random per acquisition: tells a holder its own record from another's
    token: str = ""

    def describe(self) -> str:
        def stamp(t: float) -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

        return (
            f"{self.owner} ({self.purpose or 'no purpose given'}; since "
            f"{stamp(self.acquired_at)}, expires {stamp(self.expires_at)} unless renewed)"
        )


def _gen_name(gen: int) -> str:
    return f"{gen:012d}.json"


def default_owner() -> str:
    """``host:pid:random``, unique per lease object."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _generations(lease_dir: str) -> list[int]:
    try:
        names = storage.list_files(lease_dir, suffixes=(".json",), recursive=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    stems = (storage.basename(uri)[: -len(".json")] for uri in names)
    return sorted(int(stem) for stem in stems if stem.isdigit())


@dataclass(frozen=True)
class LeaseFence:
    """Proof of holding generation ``gen`` of the lease in ``lease_dir``: picklable, for
    the workers that write on the holder's behalf (e.g. Ray actors writing parts)."""

    lease_dir: str
    gen: int
    owner: str

    def assert_held(self) -> None:
        """Raise :class:`LeaseLost` unless ``gen`` is still the newest generation; call it
        right before a write. A takeover creates a newer generation first, and a newer
        holder deletes older ones, so one listing tells."""
        gens = _generations(self.lease_dir)
        if not gens or gens[-1] != self.gen:
            newest = gens[-1] if gens else None
            raise LeaseLost(
                f"{storage.parent(self.lease_dir)}: lease generation {self.gen} of {self.owner} "
                f"is no longer current (newest: {newest}); not writing"
            )


class Lease:
    """An exclusive lease on ``folder``; use as a context manager or acquire/release.

    Args:
        folder: the folder (local or ``s3://``) the lease guards; records go under
            ``folder/_lease/``.
        ttl_s: how long the lease stays valid without a renewal; a crashed holder's
            lease can be taken over after that.
        wait_s: how long :meth:`acquire` waits for a live holder to finish (0 = not at all).
        purpose: shown to a run that finds the lease held (e.g. the command line).
        clock: this machine's wall clock, only for the times shown in records (expiry goes
            by the storage's clock; tests pass a skewed one).
    """

    def __init__(
        self,
        folder: str,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float = 0.0,
        purpose: str = "",
        owner: str | None = None,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease TTL must be > 0 seconds, got {ttl_s}")
        if wait_s < 0:
            raise ValueError(f"lease wait must be >= 0 seconds, got {wait_s}")
        self.folder = storage.normalize(folder)
        self.dir = storage.join(self.folder, LEASE_DIR)
        self.ttl_s, self.wait_s, self.poll_s = float(ttl_s), float(wait_s), float(poll_s)
        self.purpose = purpose
        self.owner = owner or default_owner()
        self.clock = clock
        self.gen: int | None = None
        self._renewed = 0.0  # time.monotonic() of the last successful write of our record
        self._record: LeaseRecord | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ records
    def _uri(self, gen: int) -> str:
        return storage.join(self.dir, _gen_name(gen))

    def _generations(self) -> list[int]:
        return _generations(self.dir)

    def _storage_now(self) -> float:
        """The storage's clock now: the modification time of a probe object written now."""
        probe = storage.join(self.dir, f".clock-{uuid.uuid4().hex}")
        storage.write_bytes(probe, b"")
        try:
            return storage.modified_time(probe)
        finally:
            with contextlib.suppress(OSError):
                storage.delete(probe)

    def _expired(self, gen: int, rec: LeaseRecord) -> bool:
        """Released, or not renewed for longer than its TTL by the storage's clock."""
        if rec.released:
            return True
        try:
            written = storage.modified_time(self._uri(gen))
        except FileNotFoundError:
            return True  # deleted meanwhile: a newer generation exists, look again
        return self._storage_now() - written > rec.ttl_s

    def _read(self, gen: int) -> LeaseRecord | None:
        """The record of ``gen``; None when it is unreadable (never a valid holder)."""
        try:
            raw = json.loads(storage.read_text(self._uri(gen)))
            # fields added by a newer mspray are ignored, not a reason to take over
            return LeaseRecord(
                **{f.name: raw[f.name] for f in fields(LeaseRecord) if f.name in raw}
            )
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("lease record %s is unreadable (%s); treating it as expired", gen, e)
            return None

    def current(self) -> tuple[int | None, LeaseRecord | None]:
        """The highest generation and its record (``None, None`` when there is none)."""
        gens = self._generations()
        if not gens:
            return None, None
        return gens[-1], self._read(gens[-1])

    @staticmethod
    def _encode(rec: LeaseRecord) -> bytes:
        return json.dumps(asdict(rec), indent=2).encode()

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for a live holder; raises
        :class:`LeaseHeld` (naming the holder) when it is still held after that."""
        if self.gen is not None:
            raise RuntimeError("lease already acquired")
        deadline = time.monotonic() + self.wait_s
        announced = False
        while True:
            gen, rec = self.current()
            if rec is None or self._expired(gen, rec):
                if rec is not None and not rec.released:
                    log.warning("%s: taking over the expired lease of %s", self.dir, rec.describe())
                nxt = 0 if gen is None else gen + 1
                now = self.clock()
                mine = LeaseRecord(
                    self.owner, now, now + self.ttl_s, self.ttl_s, self.purpose, False,
                    uuid.uuid4().hex,
                )  # fmt: skip
                renewed = time.monotonic()
                if storage.create_exclusive(self._uri(nxt), self._encode(mine)) or self._mine(
                    nxt, mine
                ):
                    self.gen, self._record, self._renewed = nxt, mine, renewed
                    self._cleanup(nxt)
                    self._start_heartbeat()
                    log.info("%s: lease %d acquired by %s", self.dir, nxt, self.owner)
                    return self
                continue  # another run created that generation first: look again
            left = deadline - time.monotonic()
            message = (
                f"{self.folder} is in use: its lease is held by {rec.describe()}. "
                + (
                    f"Waited {self.wait_s:.0f}s. "
                    if self.wait_s > 0
                    else "Wait for it with --lease-wait SECONDS, or retry later. "
                )
                + f"A crashed holder's lease can be taken over after it expires ({rec.ttl_s:.0f}s "
                "after its last renewal)."
            )
            if left <= 0:
                raise LeaseHeld(message, rec)
            if not announced:
                log.info("%s: waiting up to %.0fs for %s", self.dir, left, rec.describe())
                announced = True
            time.sleep(min(self.poll_s, left))

    def _mine(self, gen: int, mine: LeaseRecord) -> bool:
        """True if generation ``gen`` holds our record after all: the client retried a
        conditional write whose first attempt succeeded but whose response was lost, and
        the retry was refused (412) because of that very write."""
        rec = self._read(gen)
        if rec is not None and rec.token == mine.token:
            log.info(
                "%s: lease %d: the refused write had succeeded before; it is ours", self.dir, gen
            )
            return True
        return False

    def fence(self) -> LeaseFence:
        """A picklable token that workers check before each write (see :class:`LeaseFence`)."""
        if self.gen is None:
            raise RuntimeError("lease not acquired")
        return LeaseFence(self.dir, self.gen, self.owner)

    def assert_held(self) -> None:
        """:meth:`check`, then the storage's word that no newer generation exists."""
        self.check()
        self.fence().assert_held()

    def _cleanup(self, gen: int) -> None:
        """Delete the records below ``gen`` (best effort: they no longer matter)."""
        for old in self._generations():
            if old < gen:
                with contextlib.suppress(OSError):
                    storage.delete(self._uri(old))

    def release(self) -> None:
        """Give the lease back (mark the record released); safe to call twice."""
        if self.gen is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._lost is None and self._record is not None:
            self._record.released = True
            self._record.expires_at = self.clock()
            try:
                storage.write_bytes(self._uri(self.gen), self._encode(self._record))
                log.info("%s: lease %d released", self.dir, self.gen)
            except OSError as e:  # it then simply expires after its TTL
                log.warning("%s: could not release lease %d: %s", self.dir, self.gen, e)
        self.gen = None

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease was taken over or could not be renewed."""
        if self._lost is not None:
            raise LeaseLost(f"{self.folder}: lease lost: {self._lost}")

    @property
    def lost(self) -> bool:
        return self._lost is not None

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="mspray-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        assert self._record is not None and self.gen is not None
        while not self._stop.wait(self.ttl_s / 3):
            try:
                gen, rec = self.current()
                if gen != self.gen:
                    self._lost = (
                        f"taken over (generation {gen}) by {rec.describe() if rec else '?'}"
                    )
                    log.error("%s: %s", self.dir, self._lost)
                    return
                started = time.monotonic()
                now = self.clock()
                renewed = LeaseRecord(**{**asdict(self._record), "expires_at": now + self.ttl_s})
                storage.write_bytes(self._uri(self.gen), self._encode(renewed))
                self._record, self._renewed = renewed, started
            except OSError as e:
                if time.monotonic() - self._renewed >= self.ttl_s:
                    self._lost = f"not renewed before it expired ({e})"
                    log.error("%s: %s", self.dir, self._lost)
                    return
                log.warning("%s: lease renewal failed, retrying: %s", self.dir, e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
