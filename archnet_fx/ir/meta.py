"""The keys under which archnet_fx stores facts in ``node.meta`` and ``GraphModule.meta``.

One vocabulary for every layer: capture writes the first two, the kind classifier the third,
passes stamp provenance, legality and the cost model read placement flags.
"""

#: ``gm.meta``: :class:`archnet_fx.capture.CaptureInfo` (method, input specs, input names).
CAPTURE_META_KEY = "archnet.capture"
#: ``gm.meta``: the ``(args, kwargs)`` the graph was captured with.
EXAMPLE_META_KEY = "archnet.example"
#: ``node.meta``: the node's canonical op kind (:func:`archnet_fx.ir.opkinds.node_kind`).
KIND_META_KEY = "archnet.kind"
#: ``node.meta``: the name of the pass that created the node.
FROM_PASS_KEY = "archnet.from_pass"
#: ``node.meta``: the rule (or surrogate candidate) that created the node.
RULE_KEY = "archnet.rule"
#: ``node.meta`` entries that say where in the user's source a node comes from.
SOURCE_META_KEYS = ("nn_module_stack", "stack_trace", "archnet.module_path")
#: ``node.meta`` flag: this node runs in the host prologue (input-only lookups).
PROLOGUE_KEY = "archnet.prologue"
#: ``node.meta`` flag: no candidate legalized this node; it runs on the host.
HOST_FALLBACK_KEY = "archnet.host_fallback"
