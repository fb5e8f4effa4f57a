"""Where independent pieces of a fit run: in this process, or as tasks on Dask.

A fitting epoch's sensitivity replicas are independent: replica r's noise and starting
velocities depend only on (seed, r), so the same replica gives the same numbers wherever
it runs. ``executor`` says where they run:

* ``"in-process"`` (the default): all replicas as one vmapped JAX program in this
  process (``run_replicas``), its batches sharded over the JAX devices present.
* ``"dask"``: a ``dask.distributed.LocalCluster`` of ``n_workers`` single-threaded worker
  processes, started for the call and stopped after it (each worker pinned to one CPU,
  so that XLA's thread pool does not oversubscribe the cores).
* a scheduler address (``"tcp://host:8786"``, or any string with ``://``), or a
  ``distributed.Client``: an existing cluster; it is neither started nor stopped here.

Each task returns its replicas' results, and ``Executor.map`` returns them in the order
the tasks were given, never in the order workers finished, so every sum taken from them
runs in one fixed order. A worker that dies has its tasks re-run elsewhere by the Dask
scheduler (``distributed.scheduler.allowed-failures`` times); a task is pure (its output
depends on its inputs only), so a re-run gives the same numbers and nothing is counted
twice. A task whose shared inputs died with the workers holding them is submitted again
(``Executor.map``). Dask is the optional extra ``dask`` (``pip install -e .[dask]``).
"""

from __future__ import annotations

import contextlib
import os

from timemachine.errors import InputError

__all__ = [
    "EXECUTORS",
    "Executor",
    "check_executor",
    "content_key",
    "device_sharding",
    "open_executor",
    "runs_on_dask",
    "worker_copy",
]

#: the named executors (besides a scheduler address or a distributed.Client)
EXECUTORS = ("in-process", "dask")

#: how many times ``Executor.map`` submits again the tasks cancelled by lost shared data
MAX_RESUBMITS = 3


def _is_client(value) -> bool:
    return type(value).__name__ == "Client" and hasattr(value, "submit")


def check_executor(executor, where: str = "executor"):
    """``executor`` as given if it is valid: "in-process", "dask", a scheduler address
    (a string with "://") or a ``distributed.Client``.

    Raises:
        InputError: naming the value; also "dask" or an address without the ``dask``
            extra installed.
    """
    if _is_client(executor):
        return executor
    if not isinstance(executor, str) or not (executor in EXECUTORS or "://" in executor):
        raise InputError(
            f"{where} must be one of {list(EXECUTORS)}, a Dask scheduler address "
            f"('tcp://host:8786') or a distributed.Client, got {executor!r}"
        )
    if executor != "in-process":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise InputError(
                f"{where}={executor!r} needs Dask: pip install 'timemachine[dask]'"
            ) from None
    return executor


def _pin_to_one_cpu(worker) -> None:
    """Pin every thread of a Dask worker process to one CPU, chosen by the worker's
    index, before JAX starts there (XLA sizes its thread pool from the CPU affinity)."""
    cpus = sorted(os.sched_getaffinity(0))
    try:
        index = int(str(worker.name).rsplit("-", 1)[-1])
    except ValueError:
        index = sum(map(ord, str(worker.name)))
    cpu = {cpus[index % len(cpus)]}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpu)


def _pin_plugin():
    """A ``WorkerPlugin`` that runs ``_pin_to_one_cpu`` on every worker, restarted ones
    included (defined here so that Dask stays an optional import)."""
    from distributed import WorkerPlugin

    class PinToOneCPU(WorkerPlugin):
        name = "timemachine-pin-cpu"
        idempotent = True

        def setup(self, worker):
            _pin_to_one_cpu(worker)

    return PinToOneCPU()


def runs_on_dask(executor) -> bool:
    """Whether ``executor`` (checked: ``check_executor``, or an ``Executor``) sends work
    to Dask."""
    if isinstance(executor, Executor):
        return executor.kind == "dask"
    return check_executor(executor) != "in-process"


class Executor:
    """Runs tasks in order-preserving batches: ``map(fn, items, *shared)`` is
    ``[fn(item, *shared) for item in items]``, in this process or on Dask.

    Use as a context manager (``open_executor``): a local cluster is started on entry and
    stopped on exit; an address or a Client is connected to and left running.

    Attributes:
        kind: "in-process" or "dask".
        n_workers: the workers of a local cluster (None otherwise).
        client: the ``distributed.Client`` while open (None in-process).
    """

    def __init__(self, executor="in-process", n_workers: int | None = None):
        self.spec = check_executor(executor)
        self.kind = "in-process" if self.spec == "in-process" else "dask"
        if n_workers is not None and (
            isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1
        ):
            raise InputError(f"n_workers must be an int >= 1, got {n_workers!r}")
        self.n_workers = (n_workers or 2) if self.spec == "dask" else None
        self.client = None
        self._cluster = None
        self._own_client = False

    def __enter__(self):
        if self.kind == "in-process":
            return self
        from distributed import Client, LocalCluster

        if _is_client(self.spec):
            self.client = self.spec
        elif self.spec == "dask":
            self._cluster = LocalCluster(
                n_workers=self.n_workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            )
            self.client = Client(self._cluster)
            self.client.register_plugin(_pin_plugin())
            self._own_client = True
        else:
            try:
                self.client = Client(self.spec, timeout=30)
            except OSError as e:
                raise InputError(f"executor {self.spec!r}: no Dask scheduler there ({e})") from None
            self._own_client = True
        return self

    def __exit__(self, *exc):
        if self._own_client:
            self.client.close()
        if self._cluster is not None:
            self._cluster.close()
        self.client = self._cluster = None
        self._own_client = False
        return False

    def slots(self) -> int:
        """How many tasks run at once: the cluster's worker threads (1 in-process)."""
        if self.kind == "in-process" or self.client is None:
            return 1
        return max(1, sum(self.client.nthreads().values()))

    def map(self, fn, items, *shared) -> list:
        """``[fn(item, *shared) for item in items]``, the results in the order of
        ``items``. On Dask each item is one task and ``shared`` is scattered to one
        worker, each other worker fetching it once for its first task (one copy per
        worker, so compiled programs keyed on it are reused across that worker's tasks).
        Not ``broadcast``: the scheduler's replication retries a worker that died during
        it forever (30 s connect timeouts, seen in CI), and the fetches serve as well.

        Scattered data has no task to recompute it: if every worker holding a copy dies
        (Dask's memory manager keeps one copy of data no waiting task needs), the tasks
        that need it are cancelled ("lost dependencies"); a scatter to a worker that just
        died fails. Those items are then submitted again with the shared values
        scattered afresh, up to ``MAX_RESUBMITS`` times; the tasks are pure, so a re-run
        gives the same numbers. A task's own error is raised.
        """
        items = list(items)
        if self.kind == "in-process":
            return [fn(item, *shared) for item in items]
        if self.client is None:
            raise RuntimeError("Executor.map outside its `with` block")
        from concurrent.futures import CancelledError

        results, pending = [None] * len(items), list(range(len(items)))
        for _ in range(1 + MAX_RESUBMITS):
            futures, futures_shared = {}, []
            try:
                try:
                    for value in shared:
                        futures_shared.append(self.client.scatter([value], hash=False)[0])
                except OSError:  # the worker it went to died (CommClosedError and timeouts)
                    continue
                futures = {i: self.client.submit(fn, items[i], *futures_shared, pure=False)
                           for i in pending}  # fmt: skip
                pending = []
                for i, f in futures.items():
                    try:
                        results[i] = f.result()  # a task's own error is raised here
                    except CancelledError:  # its shared data was lost: submit it again
                        pending.append(i)
            finally:
                for f in [*futures.values(), *futures_shared]:
                    f.release()
            if not pending:
                return results
        raise RuntimeError(
            f"Executor.map: tasks for items {pending} were cancelled "
            f"{1 + MAX_RESUBMITS} times (their shared data lost with the workers holding "
            "it, or the cluster shut down)"
        )


def open_executor(executor="in-process", n_workers: int | None = None) -> Executor:
    """An ``Executor`` for ``with`` (see the module docstring)."""
    return Executor(executor, n_workers)


#: the Systems a worker process has received, by content: each call sends a new copy of
#: the System, and the compiled programs are cached per System object, so the worker
#: reuses the first copy of the same content (the last few kept)
_WORKER_SYSTEMS: dict = {}


def content_key(system) -> str:
    """A SHA-256 of the pickled System: equal for equal content."""
    import hashlib
    import pickle

    return hashlib.sha256(pickle.dumps(system)).hexdigest()


def worker_copy(system, key: str):
    """On a worker, the first System received with content ``key`` (``content_key``),
    so that its compiled programs are reused by later tasks and epochs."""
    if key not in _WORKER_SYSTEMS:
        while len(_WORKER_SYSTEMS) >= 4:
            _WORKER_SYSTEMS.pop(next(iter(_WORKER_SYSTEMS)))
        _WORKER_SYSTEMS[key] = system
    return _WORKER_SYSTEMS[key]


def device_sharding(batch_size: int):
    """(a function placing arrays with a leading replica (or chain) axis, the batch size) for the
    JAX devices of this process: with one device, as they are; with D > 1 (several GPUs,
    or ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` on a CPU), sharded along
    the replica axis over a 1-D mesh of the D devices (``jax.sharding``), each device
    running B/D replicas of the one compiled program, and the batch rounded up to a
    multiple of D (the padding rows are copies, dropped)."""
    import jax
    import numpy as np

    devices = jax.local_devices()
    if len(devices) == 1:
        return (lambda tree: tree), batch_size
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.array(devices), ("replica",)), PartitionSpec("replica"))
    d = len(devices)
    batch_size = -(-batch_size // d) * d

    def put(tree):
        return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)

    return put, batch_size
