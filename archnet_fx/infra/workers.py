"""Independent jobs shared out over ``torch.distributed`` ranks.

``run_jobs(fn, jobs, workers=1) -> list`` returns ``[fn(job, i) for i, job in
enumerate(jobs)]``, computed:

* in this process, when ``workers == 1``;
* on **local workers** (``workers`` = N > 1): N processes are forked, join a gloo group of their
  own (file rendezvous in a temporary directory), each takes a disjoint contiguous share (rank
  *r* of *W* takes jobs ``[r·n/W, (r+1)·n/W)``), the results are exchanged with
  ``all_gather_object``, and rank 0 hands the list back. Each worker runs one intra-op thread:
  GNU OpenMP, which torch's CPU kernels use, hangs in a forked child that opens a parallel
  region after its parent did (measured here: the suite deadlocked). Results equal
  ``workers=1``'s up to floating-point summation order where a kernel splits a reduction by
  thread (bit for bit on the small models the tests use);
* **over a running process group** (``workers="group"``: the program was started by
  ``torchrun``, on one machine or several, and called ``torch.distributed.init_process_group``;
  every rank calls ``run_jobs`` with the same jobs): the ranks share the jobs as above and
  exchange results over a gloo subgroup (also under an NCCL default group), so every rank
  returns the full list in job order.

Results do not depend on how the jobs were shared when ``fn`` is deterministic given ``(job,
index)`` (seed from the index, not from the rank). An exception in a job is raised on every
rank, and here (the lowest failing rank's), after the ranks have exchanged their results; a
worker that dies stops the others at once. :func:`check_workers` refuses what cannot work
before any job starts.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

from archnet_fx.errors import OptionError

log = logging.getLogger(__name__)

__all__ = ["run_jobs", "share", "check_workers", "all_ranks"]


def share(n: int, rank: int, world: int) -> range:
    """The contiguous slice of ``n`` jobs that ``rank`` of ``world`` takes."""
    return range(n * rank // world, n * (rank + 1) // world)


def check_workers(workers: Any) -> None:
    """Raise :class:`OptionError` when ``workers`` cannot run here (before any work)."""
    import torch
    import torch.distributed as dist

    if workers == "group":
        if not (dist.is_available() and dist.is_initialized()):
            raise OptionError("workers='group' shares the work over a running torch.distributed "
                              "process group, and none is initialized: start the program with "
                              "torchrun and call torch.distributed.init_process_group() first, "
                              "or pass workers=N for N local processes")
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise OptionError(f"workers must be an integer >= 1 or 'group', got {workers!r}")
    if workers == 1:
        return
    if sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods():
        raise OptionError(f"workers={workers} forks local processes, which this platform cannot "
                          "do; use workers=1, or torchrun with workers='group'")
    if dist.is_available() and dist.is_initialized():
        raise OptionError(f"workers={workers} forks a process group of its own, but one is "
                          "already running here: pass workers='group' to share the work over it")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise OptionError(f"workers={workers} forks local processes, which CUDA (initialized in "
                          "this process) does not survive: use workers=1, or torchrun with "
                          "workers='group'")


def _exchange(fn: Callable[[Any, int], Any], jobs: Sequence[Any], rank: int, world: int,
              group: Any = None) -> list:
    import torch.distributed as dist

    try:
        mine: tuple = ("ok", [fn(jobs[i], i) for i in share(len(jobs), rank, world)])
    except BaseException as e:  # noqa: BLE001 - every rank learns of it and raises it
        exc: BaseException = e
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:  # noqa: BLE001 - an exception that does not survive pickling
            exc = RuntimeError(f"rank {rank}: {traceback.format_exc()}")
        mine = ("error", exc, traceback.format_exc())
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine, group=group)  # errors are results: no rank leaves early
    for r, part in enumerate(parts):
        if part[0] == "error":
            log.debug("rank %d failed:\n%s", r, part[2])
            raise part[1]
    return [res for part in parts for res in part[1]]


def _rank_main(fn: Callable, jobs: Sequence, rank: int, world: int, init: str,
               queue: Any) -> None:
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)         # no OpenMP parallel region in a forked child
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        try:
            out = _exchange(fn, jobs, rank, world)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            # plain pickle (tensors inline): torch's queue reductions share storage through
            # file descriptors that die with this process
            queue.put(("ok", pickle.dumps(out)))
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            queue.put(("error", rank, pickle.dumps(e), traceback.format_exc()))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            queue.put(("error", rank, None, traceback.format_exc()))


def _local(fn: Callable, jobs: Sequence, workers: int) -> list:
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="archnet-workers-") as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(fn, jobs, r, workers, init, queue),
                             daemon=True) for r in range(workers)]
        for p in procs:
            p.start()
        msg = None
        try:
            while msg is None:
                if not queue.empty():
                    msg = queue.get()
                    break
                dead = [(i, p.exitcode) for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0)]
                if dead and queue.empty():
                    raise RuntimeError(f"worker rank {dead[0][0]} died (exit code "
                                       f"{dead[0][1]}) before returning its jobs")
                time.sleep(0.05)
        finally:
            if msg is None or msg[0] != "ok":      # an error: stop the others at once
                for p in procs:
                    if p.is_alive():
                        p.terminate()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
                    p.join()
    if msg[0] == "error":
        _, rank, exc, tb = msg
        log.debug("worker rank %d failed:\n%s", rank, tb)
        err = None
        if exc is not None:
            try:
                err = pickle.loads(exc)
            except Exception:  # noqa: BLE001 - raised below with the traceback instead
                err = None
        if isinstance(err, BaseException):
            raise err
        raise RuntimeError(f"worker rank {rank} failed:\n{tb}")
    return pickle.loads(msg[1])


def run_jobs(fn: Callable[[Any, int], Any], jobs: Sequence[Any], workers: int | str = 1
             ) -> list:
    """``[fn(job, i) for i, job in enumerate(jobs)]``, shared out as the module docstring
    says (``workers``: 1, N local processes, or ``"group"``)."""
    jobs = list(jobs)
    check_workers(workers)
    if workers == "group":
        import torch.distributed as dist

        # a gloo subgroup for the objects, whatever the default group's backend (NCCL would
        # stage them on a CUDA device)
        sub = dist.new_group(backend="gloo")
        return _exchange(fn, jobs, dist.get_rank(), dist.get_world_size(), sub)
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j, i) for i, j in enumerate(jobs)]
    return _local(fn, jobs, min(workers, len(jobs)))


def all_ranks(flag: bool, workers: int | str) -> bool:
    """Whether ``flag`` holds on every rank of the running group (``workers="group"``; also a
    barrier), else ``flag`` itself: e.g. a cache entry is used only when every rank has it."""
    if workers != "group":
        return flag
    import torch.distributed as dist

    flags: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag), group=dist.new_group(backend="gloo"))
    return all(flags)
