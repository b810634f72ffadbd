"""Instruments that look at pass records and graphs; passes never print or draw themselves.

* :func:`records_table` — one row per pass: nodes created/erased/replaced, rule hits, kind delta,
  time, verification error.
* :func:`pass_diff` — one pass in detail: kind histogram before/after, rule hits, refusals with
  their reasons, created and erased nodes.
* :func:`graph_to_networkx` / :func:`write_dot` — the graph as a networkx DiGraph and as a DOT file
  (render with ``dot -Tsvg``); written atomically.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import torch.fx
from tabulate import tabulate

from archnet_fx.ir.opkinds import META_KINDS, node_kind
from archnet_fx.ir.meta import FROM_PASS_KEY
from archnet_fx.infra.records import PassRecord


def _delta_str(rec: PassRecord, limit: int = 6) -> str:
    d = rec.kind_delta()
    items = sorted(d.items(), key=lambda kv: -abs(kv[1]))
    s = ", ".join(f"{k}{v:+d}" for k, v in items[:limit])
    return s + (" …" if len(items) > limit else "") if s else "-"


def records_table(records: Iterable[PassRecord]) -> str:
    rows = []
    for r in records:
        hits = ", ".join(f"{k}×{v}" for k, v in sorted(r.rule_hits.items())) or "-"
        err = "" if r.max_abs_error is None else f"{r.max_abs_error:.2e}"
        rows.append((r.name, "yes" if r.modified else "no", len(r.created), len(r.erased),
                     len(r.replaced), hits, _delta_str(r), f"{r.seconds * 1e3:.1f}", err))
    return tabulate(rows, headers=["pass", "changed", "+nodes", "-nodes", "replaced", "rule hits",
                                   "kind delta", "ms", "max|err|"], tablefmt="github")


def pass_diff(rec: PassRecord, max_nodes: int = 40) -> str:
    kinds = sorted(set(rec.kinds_before) | set(rec.kinds_after))
    rows = [(k, rec.kinds_before[k], rec.kinds_after[k], rec.kinds_after[k] - rec.kinds_before[k])
            for k in kinds if rec.kinds_before[k] != rec.kinds_after[k]]
    parts = [f"pass {rec.name}: {'modified' if rec.modified else 'no change'} in "
             f"{rec.seconds * 1e3:.1f} ms"]
    if rows:
        parts.append(tabulate(rows, headers=["kind", "before", "after", "delta"],
                              tablefmt="github"))
    if rec.rule_hits:
        parts.append(tabulate(sorted(rec.rule_hits.items()), headers=["rule", "hits"],
                              tablefmt="github"))
    if rec.refusals:
        parts.append(tabulate([(f.node, f.rule, f.reason) for f in rec.refusals[:max_nodes]],
                              headers=["node", "rule", "refused because"], tablefmt="github"))
    if rec.replaced:
        rep = list(rec.replaced.items())[:max_nodes]
        parts.append("replaced: " + ", ".join(f"{a}→{b}" for a, b in rep)
                     + (" …" if len(rec.replaced) > max_nodes else ""))
    for title, names in (("created", rec.created), ("erased", rec.erased)):
        if names:
            parts.append(f"{title} ({len(names)}): " + ", ".join(names[:max_nodes])
                         + (" …" if len(names) > max_nodes else ""))
    for note in rec.notes:
        parts.append(f"note: {note}")
    return "\n\n".join(parts)


def graph_to_networkx(gm: torch.fx.GraphModule, *, include_meta: bool = False) -> nx.DiGraph:
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        kind = node_kind(n, gm)
        if not include_meta and kind in META_KINDS and n.op not in ("placeholder", "output"):
            continue
        tm = n.meta.get("tensor_meta")
        shape = tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None
        g.add_node(n.name, kind=kind, op=n.op, target=str(n.target), shape=shape,
                   from_pass=n.meta.get(FROM_PASS_KEY, ""))
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            if a.name in g and n.name in g:
                g.add_edge(a.name, n.name)
    return g


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(g: nx.DiGraph, title: str = "graph") -> str:
    lines = [f'digraph "{_dot_escape(title)}" {{', "  rankdir=TB;", '  node [shape=box, fontsize=10];']
    for name, d in g.nodes(data=True):
        label = f"{name}\\n{d.get('kind', '')}"
        if d.get("shape") is not None:
            label += f"\\n{list(d['shape'])}"
        style = ', style=filled, fillcolor="#ffe9b3"' if d.get("from_pass") else ""
        lines.append(f'  "{_dot_escape(name)}" [label="{label}"{style}];')
    for a, b in g.edges():
        lines.append(f'  "{_dot_escape(a)}" -> "{_dot_escape(b)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def tensor_digest(tensors: Iterable[Any]) -> str:
    """SHA-256 over the shapes, dtypes and raw bytes of ``tensors`` (non-tensors skipped): the
    key of a checkpoint's or a cache entry's model and data."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            try:   # the raw bytes, whatever the dtype (bf16 has no numpy type)
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                         .numpy().tobytes())
            except (RuntimeError, TypeError, NotImplementedError):
                pass   # quantized / meta tensors: shape and dtype only
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (no partial files)."""
    return atomic_write(path, lambda f: f.write(text))


def blocked_directory(d: Path) -> tuple[Path, str] | None:
    """Why no directory can be created or written at ``d``: ``(the nearest existing path,
    "file" | "unwritable")``, or None when it can."""
    probe = d
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return probe, "file"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return probe, "unwritable"
    return None


def process_umask() -> int:
    """The process umask, read without setting it (``os.umask`` would change global state)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def atomic_write(path: str | os.PathLike, write: Any, binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it into place;
    on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~process_umask())   # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_dot(gm: torch.fx.GraphModule, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``gm`` as a Graphviz DOT file; nodes a pass created are highlighted."""
    return atomic_write_text(path, to_dot(graph_to_networkx(gm), title or Path(path).stem))
