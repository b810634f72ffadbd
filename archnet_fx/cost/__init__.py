"""Cost: the latency model of a target (:mod:`~archnet_fx.cost.latency`): per-node compute and
memory time on the chip, fusion of elementwise epilogues, host fallback with its link and
round-trip costs (a ``torch.fx.Interpreter``), and fitting cost parameters to measurements."""
