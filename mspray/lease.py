"""An exclusive, expiring lease on a folder (local or ``s3://``), built on exclusive create.

Used so that two jobs never work on one output at once (``mspray score``). The lease is a
sequence of small JSON records ``FOLDER/_lease/<generation>.json``; the record with the
highest generation is the current state:

- *acquire*: read the current record; if there is none, or it is released, or it expired
  (its holder stopped renewing it: crashed, killed, partitioned), create generation + 1
  with :func:`mspray.storage.create_exclusive` (S3 ``If-None-Match: *``; local hard link).
  Of several runs racing for the same generation exactly one creates it; the others see
  the new record and wait or give up. A live record makes the caller wait up to
  ``wait_s`` and then raise :class:`LeaseHeld` naming the holder.
- *heartbeat*: the holder rewrites its own record with a new expiry every ``ttl_s / 3``
  seconds from a daemon thread. If a higher generation appeared (it was presumed dead and
  taken over) or it could not renew before its expiry, the lease is *lost*:
  :meth:`Lease.check` raises :class:`LeaseLost` so the job stops instead of running on
  alongside the new holder.
- *release*: the holder marks its record released; the next run starts at once.

Only the holder ever writes its own generation, so the sequence needs no compare-and-swap.
Expiry compares wall clocks of different machines: keep them NTP-synced and the TTL well
above any skew. The S3 store must honour ``If-None-Match`` on PUT (AWS S3 does).
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
    """One generation of the lease: who holds it and until when (UNIX seconds)."""

    owner: str
    acquired_at: float
    expires_at: float
    ttl_s: float
    purpose: str = ""
    released: bool = False

    def live(self, now: float) -> bool:
        return not self.released and self.expires_at > now

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


class Lease:
    """An exclusive lease on ``folder``; use as a context manager or acquire/release.

    Args:
        folder: the folder (local or ``s3://``) the lease guards; records go under
            ``folder/_lease/``.
        ttl_s: how long the lease stays valid without a renewal; a crashed holder's
            lease can be taken over after that.
        wait_s: how long :meth:`acquire` waits for a live holder to finish (0 = not at all).
        purpose: shown to a run that finds the lease held (e.g. the command line).
    """

    def __init__(
        self,
        folder: str,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float = 0.0,
        purpose: str = "",
        owner: str | None = None,
        poll_s: float = 2.0,
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
        self.gen: int | None = None
        self._record: LeaseRecord | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ records
    def _uri(self, gen: int) -> str:
        return storage.join(self.dir, _gen_name(gen))

    def _generations(self) -> list[int]:
        try:
            names = storage.list_files(self.dir, suffixes=(".json",), recursive=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        gens = []
        for uri in names:
            stem = storage.basename(uri)[: -len(".json")]
            if stem.isdigit():
                gens.append(int(stem))
        return sorted(gens)

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
            now = time.time()
            if rec is None or not rec.live(now):
                if rec is not None and not rec.released:
                    log.warning("%s: taking over the expired lease of %s", self.dir, rec.describe())
                nxt = 0 if gen is None else gen + 1
                mine = LeaseRecord(self.owner, now, now + self.ttl_s, self.ttl_s, self.purpose)
                if storage.create_exclusive(self._uri(nxt), self._encode(mine)):
                    self.gen, self._record = nxt, mine
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
            self._record.expires_at = time.time()
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
                now = time.time()
                renewed = LeaseRecord(**{**asdict(self._record), "expires_at": now + self.ttl_s})
                storage.write_bytes(self._uri(self.gen), self._encode(renewed))
                self._record = renewed
            except OSError as e:
                if time.time() >= self._record.expires_at:
                    self._lost = f"not renewed before it expired ({e})"
                    log.error("%s: %s", self.dir, self._lost)
                    return
                log.warning("%s: lease renewal failed, retrying: %s", self.dir, e)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
