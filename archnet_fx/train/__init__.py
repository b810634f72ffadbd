"""Training: cut the student into blocks and distill them against the teacher, without labels.

* :mod:`~archnet_fx.train.partition` — blocks at boundaries where few tensors are live
  (networkx on the fx graph), side inputs such as attention masks crossing every block.
* :mod:`~archnet_fx.train.distill` — blockwise distillation with fake quantization on,
  progressive (Arch-Net) or independent (HANT) inputs, checkpoints and resume.
"""
