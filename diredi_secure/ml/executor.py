"""Where the cloud's jobs run: one executor interface, in this process or on a Ray cluster.

The merge (per-device contributions of a chunk of packets, the teacher's fine-tuning) and the
per-user re-KD are written as pure task functions ``fn(shared, item) -> result`` over plain data
(numpy arrays, frozen dataclasses, model weights as safetensors bytes). A :class:`JobExecutor` maps
one over a stream of items and yields the results *in item order*, so every reduction the caller
does over them runs in the same order whichever executor ran the tasks.

* :class:`InProcessExecutor` (the default: ``diredi cloud merge``, the demo, the tests) calls the
  function here, one item after the other.
* :class:`RayExecutor` submits each item as a Ray task (``ray`` is the optional extra
  ``diredi-secure[ray]``): ``address="local"`` starts a private Ray instance on this machine with
  ``workers`` CPUs, ``"auto"`` (or ``ray://host:10001``) joins a running cluster. The shared
  argument is put in the object store once per map; at most ``max_in_flight`` tasks are pending,
  so a stream of a million packets never sits in memory at once.

Both run every task with one torch thread: CPU kernels may sum in another order with another
thread count, and the same seeds must give the same bytes on either executor (the equivalence test
checks it). Parallelism comes from running tasks side by side, not from threads inside one.

What crosses to a Ray worker stays inside the cloud's trust domain (the operator's own cluster):
opened payloads and model weights, never the inbox key; packets are opened in the job's process.
Ray serialises the task arguments with pickle between the cloud's own processes; no device input is
ever unpickled (devices send packets, which only ``open_packet`` parses).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

import torch

from ..errors import ConfigError, DirediError, LocalError

__all__ = [
    "EXECUTORS",
    "ExecutorFailed",
    "InProcessExecutor",
    "JobExecutor",
    "RayExecutor",
    "make_executor",
]

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("inprocess", "ray")


class ExecutorFailed(LocalError):
    """A task could not run (a Ray worker died, the cluster went away): the job changed nothing."""

    reason = "executor_failed"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_task(fn: Callable[[S, T], R], shared: S, item: T) -> R:
    with _one_thread():
        return fn(shared, item)


class JobExecutor(ABC):
    """Runs ``fn(shared, item)`` for a stream of items; results come back in item order.

    ``fn`` must be a module-level function (Ray ships it by reference) that depends only on its
    arguments. Raises what ``fn`` raises when that is a :class:`DirediError`; any other failure of
    a task or of the engine comes out as :class:`ExecutorFailed` raised ``from`` its cause.
    """

    name: str
    workers: int

    @abstractmethod
    def map(self, fn: Callable[[S, T], R], shared: S, items: Iterable[T]) -> Iterator[R]:
        """Lazily yield ``fn(shared, item)`` for every item, in order."""

    def run(self, fn: Callable[[S, T], R], shared: S, item: T) -> R:
        """One task."""
        return next(iter(self.map(fn, shared, [item])))

    def close(self) -> None:  # noqa: B027 - nothing to release in process
        """Release the engine (a Ray instance this executor started)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class InProcessExecutor(JobExecutor):
    """Tasks run here, one after the other (the embedded default)."""

    name = "inprocess"
    workers = 1

    def map(self, fn: Callable[[S, T], R], shared: S, items: Iterable[T]) -> Iterator[R]:
        for item in items:
            yield _run_task(fn, shared, item)

    def __repr__(self) -> str:
        return "InProcessExecutor()"


class RayExecutor(JobExecutor):
    """Tasks run as Ray tasks of one CPU each.

    ``address``: ``"local"`` starts a Ray instance in this process's session with ``workers`` CPUs
    (shut down by :meth:`close`); ``"auto"`` joins the cluster this machine belongs to (``ray
    start`` ran here), ``"ray://host:port"`` a remote one through Ray Client; a Ray already
    initialised in this process is used as it is. Every node needs this package installed (the
    same version): tasks import ``diredi_secure``.
    Raises :class:`ConfigError` when ``ray`` is not installed or the address is refused.
    """

    name = "ray"

    def __init__(
        self,
        *,
        address: str = "local",
        workers: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError(
                "the ray executor needs Ray: pip install 'diredi-secure[ray]'"
            ) from exc
        if workers is not None and workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                if address == "local":
                    ray.init(
                        num_cpus=workers or 1,
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                    )
                else:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot start or join Ray at {address!r}: {exc}") from exc
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
        self.workers = workers if workers is not None else max(cpus, 1)
        self._max_in_flight = max_in_flight or 2 * self.workers
        self._remote: Any = ray.remote(num_cpus=1, max_retries=0)(_run_task)
        self.address = address

    def map(self, fn: Callable[[S, T], R], shared: S, items: Iterable[T]) -> Iterator[R]:
        ray = self._ray
        try:
            shared_ref = ray.put(shared)
        except Exception as exc:
            raise ExecutorFailed(f"ray could not store the task input: {exc}") from exc
        pending: deque[Any] = deque()
        try:
            for item in items:
                pending.append(self._remote.remote(fn, shared_ref, item))
                if len(pending) >= self._max_in_flight:
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        finally:
            for ref in pending:  # a caller that stopped early, or a failed task
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def _get(self, ref: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if hasattr(exc, "cause") else None
            if isinstance(cause, DirediError):
                raise cause from exc
            raise ExecutorFailed(f"a ray task failed: {cause or exc}") from exc
        except ray.exceptions.RayError as exc:
            raise ExecutorFailed(f"ray failed: {exc}") from exc

    def close(self) -> None:
        if self._started:
            self._started = False
            self._ray.shutdown()

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, workers={self.workers})"


def make_executor(
    name: str = "inprocess", *, address: str = "local", workers: int | None = None
) -> JobExecutor:
    """The executor a command line names: ``inprocess`` or ``ray`` (with ``address``/``workers``)."""
    if name == "inprocess":
        return InProcessExecutor()
    if name == "ray":
        return RayExecutor(address=address, workers=workers)
    raise ConfigError(f"unknown executor {name!r} ({', '.join(EXECUTORS)})")
