"""One driver per sweep folder: `<storage>/<sweep>/sweep.lock` names its holder (host, pid). A second driver on
the same folder refuses to start, naming the holder; the lock of a dead driver is taken over.

A local folder is locked with flock, which the kernel releases when the holder dies, however it dies. An object
store has no locks: the holder refreshes the file every REFRESH_S, a lock silent for STALE_S is stale, and since
two drivers may write at once (the last writer wins) each reads the lock back after a moment and refuses unless
it is still its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid

from flatray import storage
from flatray.config import ConfigError

LOCK_FILE = "sweep.lock"
REFRESH_S = 30
STALE_S = 5 * REFRESH_S
SETTLE_S = 2.0  # how long a cloud lock is left before it is read back


class SweepLocked(ConfigError):
    """Another live driver holds the sweep folder."""


class SweepLock:
    """`with SweepLock(root):` holds the sweep folder for this process; raises SweepLocked when another live
    driver holds it."""

    def __init__(self, root: str):
        self.path = storage.join(root, LOCK_FILE)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                   "started": time.time()}
        self._stop = threading.Event()
        self._file = None  # the open, flocked lock file of a local folder

    def _record(self) -> bytes:
        return json.dumps({**self.me, "refreshed": time.time()}).encode()

    def _holder(self) -> dict | None:
        text = storage.read_text(self.path)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:  # a torn write of a killed driver: nobody holds it
            return None

    def _refuse(self, holder: dict) -> SweepLocked:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return SweepLocked(f"{self.path}: the sweep is already running (host {holder.get('host')}, pid "
                           f"{holder.get('pid')}, since {since}); wait for it to finish, stop it, or use another "
                           f"--storage or sweep name")

    def _took_over(self, holder: dict | None) -> None:
        if holder:
            print(f"[flatray] taking over the lock of a driver that is gone (host {holder.get('host')}, pid "
                  f"{holder.get('pid')}): {self.path}", flush=True)

    def acquire(self) -> None:
        if "://" not in self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self.path, "a+b")
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                raise self._refuse(self._holder() or {}) from None
            self._took_over(self._holder())  # unlocked but not emptied: its driver was killed
            self._file.truncate(0)
            self._file.write(self._record())
            self._file.flush()
            return
        holder = self._holder()
        if holder and time.time() - float(holder.get("refreshed", 0)) < STALE_S:
            raise self._refuse(holder)
        self._took_over(holder)
        storage.write_bytes(self.path, self._record())
        time.sleep(SETTLE_S)
        holder = self._holder()
        if not holder or holder.get("token") != self.me["token"]:
            raise self._refuse(holder or {})
        threading.Thread(target=self._refresh, daemon=True, name="flatray-sweep-lock").start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                storage.write_bytes(self.path, self._record())
            except OSError:  # a storage hiccup; the next refresh retries
                pass

    def release(self) -> None:
        self._stop.set()
        if self._file is not None:  # emptied, not removed: removing a flocked file races with its next taker
            self._file.truncate(0)
            self._file.close()
            self._file = None
            return
        holder = self._holder()
        if holder and holder.get("token") == self.me["token"]:
            storage.delete(self.path)

    def __enter__(self) -> "SweepLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
