"""``deepcopy`` for graphs and graph modules without torch's own deprecation noise.

torch 2.13's ``Graph.__deepcopy__`` deep-copies a torch.export module's pytree specs, and
rebuilding a ``LeafSpec`` warns (``FutureWarning: isinstance(treespec, LeafSpec) is
deprecated``) from inside torch, once per copy: nothing a user of this library can act on. Every
copy of a graph, a graph module or a model that may be one goes through :func:`deepcopy`.
"""
from __future__ import annotations

import copy
import warnings
from typing import TypeVar

T = TypeVar("T")

_LEAFSPEC = r".*isinstance\(treespec, LeafSpec\)"


def deepcopy(obj: T) -> T:
    """``copy.deepcopy(obj)`` with torch's LeafSpec deprecation warning silenced (only it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEAFSPEC, category=FutureWarning)
        return copy.deepcopy(obj)
