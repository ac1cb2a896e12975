"""Mirrors ``modules/fifo_lock.py`` (v1.10.1): ``FIFOLock``, a non-reentrant lock whose waiters get it in order.

Same interface as the real one (``acquire(blocking=True)``, ``release()``, context manager; no ``timeout``). The fake
adds two things for tests: ``locked()``/``owner``, and re-acquiring from the thread that holds it raises
``FakeDeadlock`` (a ``BaseException``, so ``except Exception`` in the code under test cannot swallow it) where the
real lock would hang forever.
"""

from __future__ import annotations

import collections
import threading

from modules import fake


class FakeDeadlock(BaseException):
    """The real FIFOLock would block forever here (same thread acquiring it twice)."""


class FIFOLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inner_lock = threading.Lock()
        self._pending_threads: collections.deque[threading.Event] = collections.deque()
        self.owner: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        with self._inner_lock:
            lock_acquired = self._lock.acquire(False)
            if lock_acquired:
                self.owner = threading.get_ident()
                fake.record("queue_lock.acquire")
                return True
            if not blocking:
                return False
            if self.owner == threading.get_ident():
                fake.record("queue_lock.deadlock")
                raise FakeDeadlock("queue_lock acquired again by the thread that holds it: the real WebUI hangs here")

            release_event = threading.Event()
            self._pending_threads.append(release_event)

        release_event.wait()
        got = self._lock.acquire()
        self.owner = threading.get_ident()
        fake.record("queue_lock.acquire")
        return got

    def release(self) -> None:
        with self._inner_lock:
            fake.record("queue_lock.release")
            self.owner = None
            if self._pending_threads:
                release_event = self._pending_threads.popleft()
                release_event.set()

            self._lock.release()

    def locked(self) -> bool:
        """Fake only."""
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, t: object, v: object, tb: object) -> None:
        self.release()
