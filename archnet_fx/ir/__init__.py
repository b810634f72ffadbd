"""The vocabulary every layer speaks: what a node *is* and what flows along the graph.

* :mod:`~archnet_fx.ir.opkinds` — the one op-kind classifier: ``nn`` modules, functional and
  method calls, ATen overloads and ONNX op types all map to canonical kinds
  (:data:`~archnet_fx.ir.opkinds.KNOWN_KINDS`); an unknown op is ``unknown:<name>``.
* :mod:`~archnet_fx.ir.opargs` — a node's arguments by name, whatever its spelling; weighted ops.
* :mod:`~archnet_fx.ir.dataflow` — which nodes depend on inputs, which are activations, which
  run in the host prologue.
* :mod:`~archnet_fx.ir.shapes` — shapes and dtypes in ``node.meta``, full or incremental.
* :mod:`~archnet_fx.ir.meta` — the ``node.meta`` / ``gm.meta`` keys.

Imports nothing of archnet_fx but :mod:`archnet_fx.errors`.
"""
