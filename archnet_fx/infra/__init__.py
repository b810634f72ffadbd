"""Pass infrastructure: how a rewrite is applied, recorded, verified and shown.

* :mod:`~archnet_fx.infra.records` — :class:`PassRecord` (what a pass changed, as data).
* :mod:`~archnet_fx.infra.graphpass` — :class:`GraphPass`: a pass maps a GraphModule to a
  :class:`PassResult` on a private copy, re-deriving only the shapes it touched.
* :mod:`~archnet_fx.infra.rules` — the one rewrite protocol (rule rows: match → filter →
  build) and its one driver, :func:`apply_rule`.
* :mod:`~archnet_fx.infra.manager` — :class:`PassManager`: a named straight-line list of
  passes, verified stage by stage.
* :mod:`~archnet_fx.infra.instruments` — tables, diffs and drawings of records and graphs
  (instruments, never code inside passes).

Imports only :mod:`archnet_fx.ir` and :mod:`archnet_fx.errors`.
"""
