"""Jobs shared over torch.distributed ranks (archnet_fx.infra.workers)."""
from __future__ import annotations

import pytest

from archnet_fx.infra.workers import all_ranks, run_jobs, share


def test_shares_are_disjoint_contiguous_and_cover_every_job():
    for n in (0, 1, 5, 7, 12):
        for world in (1, 2, 3, 4):
            got = [i for r in range(world) for i in share(n, r, world)]
            assert got == list(range(n))


def test_two_local_ranks_return_every_result_in_job_order():
    import torch.distributed as dist

    out = run_jobs(lambda job, i: (job * 2, i, dist.get_rank()), list(range(7)), workers=2)
    assert [o[:2] for o in out] == [(j * 2, j) for j in range(7)]
    assert {o[2] for o in out} == {0, 1}          # both ranks did work
    assert not dist.is_initialized()               # the group was the workers', not ours


def test_an_error_in_a_worker_is_raised_here():
    def fn(job, i):
        if job == 5:
            raise ValueError("job five is bad")
        return job
    with pytest.raises(ValueError, match="job five"):
        run_jobs(fn, list(range(6)), workers=2)


def _group_rank(rank, init, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        out = run_jobs(lambda job, i: (job + 100, dist.get_rank()), list(range(5)), "group")
        agreed = (all_ranks(True, "group"), all_ranks(rank == 0, "group"))
        queue.put((rank, (out, agreed)))
    finally:
        dist.destroy_process_group()


def test_workers_group_shares_over_a_running_process_group(tmp_path):
    """What a torchrun program gets: every rank returns every result, in job order."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_group_rank, args=(r, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    got = dict(queue.get() for _ in range(2))
    outs, agreed = {r: v[0] for r, v in got.items()}, {r: v[1] for r, v in got.items()}
    assert [o[0] for o in outs[0]] == list(range(100, 105)) == [o[0] for o in outs[1]]
    assert outs[0] == outs[1] and {o[1] for o in outs[0]} == {0, 1}
    # all_ranks: true only where every rank says so (a cache entry one rank lacks is not used)
    assert agreed[0] == agreed[1] == (True, False)


@pytest.mark.parametrize("workers, match", [(0, "integer >= 1"), ("3", "integer >= 1"),
                                            (True, "integer >= 1"),
                                            ("group", "no.*initialized|none is initialized")])
def test_unusable_workers_are_refused_before_any_job(workers, match):
    from archnet_fx.errors import OptionError

    ran = []
    with pytest.raises(OptionError, match=match):
        run_jobs(lambda job, i: ran.append(job), [1, 2, 3], workers)
    assert not ran
