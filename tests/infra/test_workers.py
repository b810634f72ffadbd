"""Jobs shared over torch.distributed ranks (archnet_fx.infra.workers)."""
from __future__ import annotations

import pytest

from archnet_fx.infra.workers import run_jobs, share


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
