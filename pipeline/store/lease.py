"""Leases: at most one computer of a content key at a time, across renders, processes and machines.

A render that is about to compute a key takes the key's lease; another render that needs the
same key at the same time finds the lease alive, waits for the artifact and takes it as a hit.
A lease is a note ``leases/<key>/<generation>`` (``Store.create_note``)::

    {"schema": "anim.lease/1", "holder": "<render id>", "generation": 3,
     "started": <epoch>, "renewed": <epoch>, "ttl_s": 20.0, "info": {...}}

* **Taking** creates generation ``n + 1`` exclusively, where ``n`` is the highest generation
  there: of two racing takers one wins, with no lock and no deletion in the way.
* **Alive** while the highest generation was renewed less than ``ttl_s`` ago. Its holder
  renews it from a heartbeat thread every ``ttl_s / 3`` while it works.
* **Expired** (the holder died: its process, its machine, or the driver whose tasks Ray
  killed): the next taker creates the next generation over it and is told whose lease it
  replaced (``Lease.took_over``), with when it started and was last renewed — the dead holder's
  time is known to have been spent.
* **Released** by removing its note once the artifact is committed (or the work failed), so
  a waiter sees the artifact, or a free key, at its next look.

A holder that stalls past ``ttl_s`` without dying can lose its lease to another render and
both compute the key; the store's first-manifest-wins keeps one artifact, and both spends are
recorded. On a remote filesystem without conditional puts, two takers of one generation can
both win in the same instant, with the same outcome.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.store.base import Store
from pipeline.store.manifest import StoreError

LEASES = "leases"  # the notes' kind
SCHEMA = "anim.lease/1"


def _name(generation: int) -> str:
    return f"{generation:08d}"


def _generations(store: Store, key: str) -> list[int]:
    return sorted(int(n) for n in store.notes(LEASES, key) if n.isdigit())


@dataclass(frozen=True)
class LeaseInfo:
    """One generation of a key's lease, as its note says."""

    key: str
    generation: int
    holder: str
    started: float
    renewed: float
    ttl_s: float
    info: dict[str, Any] = field(default_factory=dict)

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) > self.renewed + self.ttl_s

    def dump(self) -> bytes:
        return json.dumps({"schema": SCHEMA, "holder": self.holder, "generation": self.generation,
                           "started": self.started, "renewed": self.renewed, "ttl_s": self.ttl_s,
                           "info": self.info}).encode()

    @classmethod
    def parse(cls, key: str, generation: int, raw: bytes) -> "LeaseInfo":
        """The lease a note holds; a note that is not one reads as a lease that expired long ago
        (a half-written note of a dead holder must not block the key)."""
        try:
            data = json.loads(raw)
            return cls(key, generation, str(data["holder"]), float(data["started"]), float(data["renewed"]),
                       float(data["ttl_s"]), dict(data.get("info") or {}))
        except (ValueError, KeyError, TypeError):
            return cls(key, generation, "?", 0.0, 0.0, 0.0)


def current(store: Store, key: str) -> LeaseInfo | None:
    """The key's lease now (its highest generation), alive or expired; None if there is none."""
    for _ in range(3):
        gens = _generations(store, key)
        if not gens:
            return None
        raw = store.read_note(LEASES, key, _name(gens[-1]))
        if raw is not None:
            return LeaseInfo.parse(key, gens[-1], raw)
        # released between the listing and the read: look again
    return None


def clear(store: Store, info: LeaseInfo) -> None:
    """Remove a lease whose holder is known to be gone — e.g. a worker its own driver killed —
    if it is still that lease, so waiters need not sit out its expiry."""
    now = current(store, info.key)
    if now is not None and (now.generation, now.holder, now.started) == (info.generation, info.holder, info.started):
        store.remove_note(LEASES, info.key, _name(info.generation))


class Lease:
    """A lease this process holds: ``keep_alive()`` renews it from a daemon thread until
    ``release()``. ``took_over`` is the expired lease it replaced, if any."""

    def __init__(self, store: Store, info: LeaseInfo, took_over: LeaseInfo | None = None):
        self.store, self.info, self.took_over = store, info, took_over
        self.lost = False  # another holder took the key over (it outlived the lease)
        self.released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return self.info.key

    @property
    def generation(self) -> int:
        return self.info.generation

    def _still_mine(self) -> bool:
        """Whether the key's lease is still this one (a generation number can be taken again
        once released, so the holder and start are compared, not only the number)."""
        now = current(self.store, self.key)
        mine = now is not None and (now.generation, now.holder, now.started) == (
            self.generation, self.info.holder, self.info.started)
        self.lost = self.lost or not mine
        return mine

    def renew(self) -> None:
        if not self._still_mine():
            return
        self.info = replace(self.info, renewed=time.time())
        self.store.write_note(LEASES, self.key, _name(self.generation), self.info.dump())

    def keep_alive(self) -> "Lease":
        def beat() -> None:
            while not self._stop.wait(self.info.ttl_s / 3) and not self.lost:
                try:
                    self.renew()
                except Exception:  # a store that does not answer now: try again at the next beat
                    pass

        self._thread = threading.Thread(target=beat, name=f"lease-{self.key[:8]}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop renewing and remove the lease (a lease taken over by another holder is theirs).
        Releasing twice is releasing once."""
        if self.released:
            return
        self.released = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._still_mine():
            self.store.remove_note(LEASES, self.key, _name(self.generation))

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def try_acquire(store: Store, key: str, *, holder: str, ttl_s: float,
                info: dict[str, Any] | None = None) -> Lease | LeaseInfo:
    """Take ``key``'s lease if nobody holds a live one: the new ``Lease`` (not yet kept alive);
    else the live ``LeaseInfo`` of its holder. An expired lease is taken over."""
    if ttl_s <= 0:
        raise ValueError(f"ttl_s={ttl_s}: a lease must live a positive time")
    for _ in range(8):
        gens = _generations(store, key)
        top = gens[-1] if gens else 0
        stale = None
        if top:
            raw = store.read_note(LEASES, key, _name(top))
            if raw is None:
                continue  # released meanwhile: look again
            stale = LeaseInfo.parse(key, top, raw)
            if not stale.expired():
                return stale
        now = time.time()
        mine = LeaseInfo(key, top + 1, holder, now, now, float(ttl_s), dict(info or {}))
        if store.create_note(LEASES, key, _name(mine.generation), mine.dump()):
            for g in gens:  # older generations are dead or released: tidy them away
                store.remove_note(LEASES, key, _name(g))
            return Lease(store, mine, took_over=stale)
        # another taker created this generation first: look again
    got = current(store, key)
    if got is None:
        raise StoreError(f"the lease of {key[:12]} in {store.url} could not be taken nor read (eight races lost "
                         "in a row); retry")
    return got
