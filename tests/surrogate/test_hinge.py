"""archnet_fx.surrogate.hinge: the interval form equals the hinge form, values and gradients."""
import math
import operator

import torch
import torch.fx
import pytest

from archnet_fx.surrogate.hinge import hinge_sum, tracing
from archnet_fx.surrogate.pwl import PWL


def _params(k, seed, with_neg):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, 1, generator=g) + 0.5
    if with_neg:
        w[::3] *= -1
        w[1] = 0.0
    beta = torch.randn(k, generator=g) * 2
    c = torch.randn(1, k, generator=g)
    a, s = torch.randn(1, generator=g), torch.randn((), generator=g)
    return [t.requires_grad_() for t in (w, beta, c, a, s)]


@pytest.mark.parametrize("with_neg", [False, True])
def test_interval_form_matches_hinges(with_neg):
    x = (torch.randn(7, 33, generator=torch.Generator().manual_seed(3)) * 3).requires_grad_()
    ps = _params(16, 1, with_neg)
    outs, grads = [], []
    for fast in (False, True):
        y = hinge_sum(x, *ps, fast=fast)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs.append(y.detach())
        grads.append([t.grad.clone() for t in [x, *ps]])
        for t in [x, *ps]:
            t.grad = None
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_fast, g_ref, name in zip(grads[1], grads[0], ["x", "w", "beta", "c", "a", "s"]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4, msg=name)


def test_pwl_traces_to_hinges_and_runs_fast_eagerly():
    pwl = PWL.fit(torch.tanh, None, -4.0, 4.0, knots=12)
    x = torch.linspace(-6, 6, 101)
    gm = torch.fx.symbolic_trace(pwl)
    kinds = {n.target for n in gm.graph.nodes if n.op in ("call_module", "call_function")}
    assert torch.relu in kinds and "inner" in kinds and "outer" in kinds  # the chip's form
    assert not any("bucketize" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(pwl(x), gm(x), rtol=1e-5, atol=1e-5)
    assert not tracing(x)
    assert (pwl(x) - torch.tanh(x)).abs()[25:76].max() < 0.05


def test_decreasing_hinges_over_a_wide_range():
    """LayerNorm's 1/sqrt PWL: all hinges decreasing, breakpoints spanning 6 decades — the
    interval tables must not lose the value to cancellation."""
    from archnet_fx.passes.layernorm import fit_rsqrt

    pwl = fit_rsqrt(1e-3, 1e3, 1e-12, 24)
    v = torch.logspace(-3, 3, 2001)
    fast = pwl(v)
    with torch.no_grad():
        ref = hinge_sum(v, pwl.inner.weight, pwl.inner.bias, pwl.outer.weight,
                        pwl.outer.bias, pwl.slope, fast=False)
    assert ((fast - ref).abs() / ref.abs()).max() < 1e-4


@pytest.mark.parametrize("pinned", [True, False])
def test_zero_slope_leaves_no_multiply_in_the_traced_form(pinned):
    """A pinned zero slope (exp, GELU, the LayerNorm's 1/√x) emits no ``x · 0`` kernel; a
    fitted slope keeps its multiply; both traced forms equal the eager function."""
    pwl = PWL.fit(torch.tanh if not pinned else torch.sigmoid, None, -4.0, 4.0, knots=12,
                  left_slope=0.0 if pinned else None)
    assert (float(pwl.slope.detach()) == 0.0) == pinned
    gm = torch.fx.symbolic_trace(pwl)
    muls = [n for n in gm.graph.nodes if n.target in (operator.mul, torch.mul)]
    assert len(muls) == (0 if pinned else 1)
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(gm(x), pwl(x), rtol=1e-5, atol=1e-5)


def test_convex_decreasing_pwl_has_no_cancellation_and_equal_ripple():
    """1/x and 1/√x as non-negative decreasing hinges: the float32 hinge form (the chip's)
    equals the float64 function to the interpolation error, which is centred (equal ripple);
    an increasing-hinge fit of the same size cancels to a far larger float32 error."""
    x = torch.logspace(0, math.log10(128), 20001)
    for fn, bound in ((torch.reciprocal, 5e-5), (torch.rsqrt, 2e-5)):
        pwl = PWL.convex_decreasing(fn, 0.9, 135.0, 256)
        assert bool((pwl.outer.weight >= 0).all()) and float(pwl.slope.detach()) == 0.0
        with torch.no_grad():
            rel = hinge_sum(x, pwl.inner.weight, pwl.inner.bias, pwl.outer.weight,
                            pwl.outer.bias, None, fast=False).double() / fn(x.double()) - 1
        assert float(rel.abs().max()) <= bound
        assert float(rel.max()) == pytest.approx(-float(rel.min()), rel=0.2)   # centred
    inc = PWL.fit(torch.reciprocal, None, 0.9, 135.0, knots=256, spacing="geometric")
    with torch.no_grad():
        rel_inc = hinge_sum(x, inc.inner.weight, inc.inner.bias, inc.outer.weight,
                            inc.outer.bias, inc.slope, fast=False).double() * x.double() - 1
    assert float(rel_inc.abs().max()) > 20 * 5e-5
    with pytest.raises(ValueError, match="0 < lo < hi"):
        PWL.convex_decreasing(torch.reciprocal, 0.0, 1.0, 8)


def test_skip_term_is_structural_for_the_trace_cache_and_export():
    """Whether a PWL has its ``s·x`` term is fixed at build (``has_skip``): two PWLs of the same
    size with and without it trace to different cached bodies, each equal to its own eager
    function, and ``torch.export`` (fake parameters: no value may steer the trace) captures
    both."""
    from archnet_fx.legality import structure_key, traced_body

    pinned = PWL.fit(torch.sigmoid, None, -4.0, 4.0, knots=12, left_slope=0.0)
    free = PWL.fit(torch.tanh, None, -4.0, 4.0, knots=12)
    assert not pinned.has_skip and free.has_skip and "slope" in dict(pinned.named_buffers())
    assert structure_key(pinned) != structure_key(free)
    x = torch.linspace(-6, 6, 101)
    with torch.no_grad():
        for pwl in (pinned, free):
            torch.testing.assert_close(traced_body(pwl)(x), pwl(x), rtol=1e-5, atol=1e-5)
            ep = torch.export.export(pwl, (x,))
            torch.testing.assert_close(ep.module()(x), pwl(x), rtol=1e-5, atol=1e-5)
