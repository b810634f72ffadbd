"""The canonical op-kind vocabulary, importable without torch (target files are checked
against it by ``archnet-fx targets``, which must start fast).

The classifier that maps nodes to these names is :mod:`archnet_fx.ir.opkinds`.
"""

#: Every canonical op kind: what the fx/ATen and ONNX tables of opkinds emit (besides ``unknown:*`` and
#: the meta kinds) and what a target file's ``ops`` may name.
KNOWN_KINDS: frozenset[str] = frozenset(
    """
    linear conv conv_transpose matmul einsum
    batch_norm layer_norm group_norm instance_norm rms_norm
    embedding gather one_hot
    relu relu6 leaky_relu prelu clamp gelu silu sigmoid tanh hardswish hardsigmoid elu softplus
    mish erf softmax log_softmax sdpa multihead_attention
    add sub mul div neg pow exp log sqrt rsqrt reciprocal abs maximum minimum where masked_fill
    mean sum var std reduce_max reduce_min cumsum
    max_pool avg_pool adaptive_avg_pool adaptive_max_pool upsample
    concat reshape permute expand slice pad cast compare logical creation dropout identity
    """.split()
)
