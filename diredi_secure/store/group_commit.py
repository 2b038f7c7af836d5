"""Group commit: one writer thread drains a queue and commits each batch in one transaction.

Why: a durable commit costs one ``fsync`` (SQLite WAL, ``synchronous=FULL``) or one WAL flush and
round trip (PostgreSQL) whatever it holds, so committing the packets that arrived together costs
what one packet used to. Each caller blocks in :meth:`GroupCommitter.submit` until the transaction
holding its item has committed (or refused it), so a receipt is still sent only after the commit
that holds its packet.

Latency: the writer never waits for company when it is idle. It takes what is queued (up to
``max_batch``) and commits at once; it lingers up to ``max_wait_s`` for more only when the batch
before held more than one item (there is load), so a lone packet is not delayed and a busy server
fills its batches. While a commit runs, new arrivals queue up and form the next batch.

The committer knows nothing of packets: ``commit(items)`` returns one outcome per item, in order,
either a result or the exception to raise in that item's caller (a refusal of one item must not
abort the others: the store's batch does its checks per item and falls back to one transaction
per item when the batch as a whole fails).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import StoreError

__all__ = ["GroupCommitConfig", "GroupCommitter"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class GroupCommitConfig:
    """Bounds of one batch: at most ``max_batch`` items, lingering at most ``max_wait_s``."""

    max_batch: int = 64
    max_wait_s: float = 0.002

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 10_000:
            raise ValueError(f"max_batch must be 1..10000, got {self.max_batch!r}")
        if not 0 <= self.max_wait_s <= 1.0:
            raise ValueError(f"max_wait_s must be 0..1 s, got {self.max_wait_s!r}")


class _Slot(Generic[R]):
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: R | BaseException | None = None


_STOP = object()


class GroupCommitter(Generic[T, R]):
    """A writer thread (started on first use) committing queued items in batches.

    ``commit`` runs only on the writer thread, so the store's write transactions never contend
    with each other inside one process.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        config: GroupCommitConfig = GroupCommitConfig(),  # frozen: one shared default is safe
        name: str = "diredi-store-writer",
    ) -> None:
        self._commit = commit
        self._config = config
        self._name = name
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self.batches = 0
        """Transactions committed so far (for tests and metrics)."""
        self.items = 0
        """Items those transactions held."""

    def submit(self, item: T) -> R:
        """Block until the transaction holding ``item`` has committed; return its result.

        Raises the item's own refusal (a typed error), or :class:`StoreError` if the committer is
        closed.
        """
        if self._closed:
            raise StoreError("the store's writer is closed")
        self._ensure_started()
        slot: _Slot[R] = _Slot()
        self._queue.put((item, slot))
        slot.done.wait()
        outcome = slot.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome  # type: ignore[return-value]  # set by the writer before done

    def close(self) -> None:
        """Commit what is queued, then stop the writer. Idempotent."""
        with self._start_lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._closed:
                raise StoreError("the store's writer is closed")
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        linger = False
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = self._drain(batch, linger)
            linger = len(batch) > 1
            self._commit_batch(batch)
            if stop:
                return

    def _drain(self, batch: list[object], linger: bool) -> bool:
        """Add queued items to ``batch``; True if the stop marker was met (commit, then stop)."""
        deadline: float | None = None
        while len(batch) < self._config.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if not linger or self._config.max_wait_s <= 0:
                    return False
                if deadline is None:
                    deadline = time.monotonic() + self._config.max_wait_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _commit_batch(self, batch: list[object]) -> None:
        pairs: list[tuple[T, _Slot[R]]] = batch  # type: ignore[assignment]  # only pairs are queued
        try:
            outcomes: Sequence[R | BaseException] = self._commit([item for item, _ in pairs])
            if len(outcomes) != len(pairs):
                raise StoreError(f"batch commit returned {len(outcomes)} outcomes for {len(pairs)}")
        except BaseException as exc:  # handed to every waiting caller, never lost
            outcomes = [exc] * len(pairs)
        self.batches += 1
        self.items += len(pairs)
        for (_, slot), outcome in zip(pairs, outcomes, strict=True):
            slot.outcome = outcome
            slot.done.set()
