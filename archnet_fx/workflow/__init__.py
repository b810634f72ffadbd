"""The command-line workflow's building blocks, usable from Python too.

* :mod:`~archnet_fx.workflow.models` — MODEL as a built-in name, ``package.module:factory`` or a
  local Hugging Face model directory, with the preprocessor found beside it.
* :mod:`~archnet_fx.workflow.calib` — unlabeled calibration data from files: a text file, a
  folder of images, ``.npy``/``.npz``/``.pt`` tensors; typed errors naming file and line.
* :mod:`~archnet_fx.workflow.artifacts` — the output directory: ``model.onnx``, ``report.md``,
  ``report.json`` and the PNG figures, each written atomically.
"""
