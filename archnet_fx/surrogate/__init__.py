"""Surrogates: trainable modules built only from ops a target runs, and how they are chosen.

* :mod:`~archnet_fx.surrogate.base` — :class:`Surrogate` (the module base class),
  :class:`Candidate` (a rewrite rule plus its style and the op kinds it needs), the styles and
  the one default style.
* :mod:`~archnet_fx.surrogate.pwl`, :mod:`~archnet_fx.surrogate.hinge` — piecewise-linear
  functions as sums of ReLUs, fitted by least squares, evaluated without the hidden tensor.
* :mod:`~archnet_fx.surrogate.products` — products of two activations in the form a target
  allows (mul, matmul with inner dimension 1, quarter squares), row sums.
* :mod:`~archnet_fx.surrogate.observe` — samples of the replaced nodes' inputs on calibration
  data (an Interpreter).
* :mod:`~archnet_fx.surrogate.driver` — :class:`SurrogatePass`: per node, the candidates in
  order (user choice, exact, preferred style, the rest), applied by the one rule driver, each
  built body vetted on the target.

The candidate families themselves are :mod:`archnet_fx.passes` (one file per family).
"""
