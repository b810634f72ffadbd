"""Independent jobs shared out over ``torch.distributed`` ranks.

``run_jobs(fn, jobs, workers=1) -> list`` returns ``[fn(job, i) for i, job in
enumerate(jobs)]``, computed:

* in this process, when ``workers == 1`` and no process group is running;
* **inside a running process group** (the program was started by ``torchrun``, on one
  machine or several, and called ``torch.distributed.init_process_group``): every rank calls
  ``run_jobs`` with the same jobs, takes a disjoint contiguous share (rank *r* of *W* takes
  jobs ``[r·n/W, (r+1)·n/W)``), and the results are exchanged with
  ``torch.distributed.all_gather_object``, so every rank returns the full list in job order;
* **on local workers** (``workers > 1``, no group running): ``workers`` processes are forked,
  join a gloo group of their own (file rendezvous in a temporary directory), share the jobs as
  above, and rank 0 hands the list back; each gets ``threads // workers`` intra-op threads.

Results are the same whichever way they are computed when ``fn`` is deterministic given
``(job, index)`` (seed from the index, not from the rank) — up to floating-point summation
order where the thread count per process differs. An exception in a job is raised on every
rank (the lowest failing rank's), after the ranks have exchanged their results.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

__all__ = ["run_jobs", "share"]


def share(n: int, rank: int, world: int) -> range:
    """The contiguous slice of ``n`` jobs that ``rank`` of ``world`` takes."""
    return range(n * rank // world, n * (rank + 1) // world)


def _group() -> tuple[int, int] | None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _shared(fn: Callable[[Any, int], Any], jobs: Sequence[Any], rank: int,
            world: int) -> list:
    import torch.distributed as dist

    try:
        mine: tuple = ("ok", [fn(jobs[i], i) for i in share(len(jobs), rank, world)])
    except Exception as e:  # noqa: BLE001 - every rank learns of it and raises it
        exc: BaseException = e
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            exc = RuntimeError(f"rank {rank}: {traceback.format_exc()}")
        mine = ("error", exc, traceback.format_exc())
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)   # no rank leaves the group early: errors are results
    for r, part in enumerate(parts):
        if part[0] == "error":
            log.debug("rank %d failed:\n%s", r, part[2])
            raise part[1]
    return [res for part in parts for res in part[1]]


def _rank_main(fn: Callable, jobs: Sequence, rank: int, world: int, init: str, queue: Any,
               threads: int) -> None:
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        try:
            out = _shared(fn, jobs, rank, world)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            # plain pickle (tensors inline): torch's queue reductions share storage through
            # file descriptors that die with this process
            queue.put(("ok", pickle.dumps(out)))
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        try:
            queue.put(("error", rank, e, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            queue.put(("error", rank, None, traceback.format_exc()))


def _local(fn: Callable, jobs: Sequence, workers: int) -> list:
    import torch
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    threads = max(1, torch.get_num_threads() // workers)
    with tempfile.TemporaryDirectory(prefix="archnet-workers-") as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(fn, jobs, r, workers, init, queue,
                                                      threads), daemon=True)
                 for r in range(workers)]
        for p in procs:
            p.start()
        try:
            while True:
                if not queue.empty():
                    msg = queue.get()
                    break
                dead = [(i, p.exitcode) for i, p in enumerate(procs)
                        if p.exitcode not in (None, 0)]
                if dead:
                    if not queue.empty():
                        continue
                    raise RuntimeError(f"worker rank {dead[0][0]} died (exit code "
                                       f"{dead[0][1]}) before returning its jobs")
                time.sleep(0.05)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.terminate()
    if msg[0] == "error":
        _, rank, exc, tb = msg
        log.debug("worker rank %d failed:\n%s", rank, tb)
        if isinstance(exc, BaseException):
            raise exc
        raise RuntimeError(f"worker rank {rank} failed:\n{tb}")
    return pickle.loads(msg[1])


def run_jobs(fn: Callable[[Any, int], Any], jobs: Sequence[Any], workers: int = 1) -> list:
    """``[fn(job, i) for i, job in enumerate(jobs)]``, shared out as the module docstring
    says."""
    jobs = list(jobs)
    group = _group()
    if group is not None:
        return _shared(fn, jobs, *group)
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j, i) for i, j in enumerate(jobs)]
    return _local(fn, jobs, min(workers, len(jobs)))
