"""archnet_fx.ir.copying: copies of torch.export-captured graphs without torch's own noise."""
from __future__ import annotations

import warnings

import torch

from archnet_fx.ir.copying import deepcopy


class _Kw(torch.nn.Module):
    def forward(self, x, *, mask):
        return (x * mask).sum(-1)


def _exported() -> torch.fx.GraphModule:
    ex = torch.export.export(_Kw(), (torch.randn(2, 3),), {"mask": torch.ones(2, 3)})
    return ex.module()


def test_deepcopy_of_an_exported_module_is_silent_and_equal():
    gm = _exported()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # any warning at all fails
        dup = deepcopy(gm)
    x, m = torch.randn(2, 3), torch.rand(2, 3)
    assert torch.equal(dup(x, mask=m), gm(x, mask=m)) and dup is not gm
    # only the one deprecation is silenced: other warnings still reach the caller
    with warnings.catch_warnings(record=True) as seen2:
        warnings.simplefilter("always")

        class Noisy:
            def __deepcopy__(self, memo):
                warnings.warn("something else", UserWarning)
                return Noisy()
        deepcopy(Noisy())
    assert [str(w.message) for w in seen2] == ["something else"]
