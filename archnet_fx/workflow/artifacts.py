"""The output directory of ``archnet-fx transform --out-dir DIR``.

============================  ===================================================================
``model.onnx``                the integer QDQ export, checked in onnxruntime (written by
                              :func:`~archnet_fx.export.onnx.export_onnx`)
``report.md``                 the transform report, latency before/after, the export check
``report.json``               the same as data
``block_loss.png``            per-block distillation loss before and after training
``latency_by_kind.png``       estimated latency on the target by op kind, original vs result
``selection_front.png``       with ``--speedup``/``--latency-budget``/``--min-fidelity``: the
                              selection's predicted latency/fidelity front and its choice
============================  ===================================================================

Every file is written through a temporary file and a rename: an interrupted run leaves the
previous file or none, never half of one. The figures need matplotlib (``.[plot]`` or
``.[hf]``); without it they are skipped with a warning and the report says so.
"""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from archnet_fx.infra.instruments import atomic_write, atomic_write_text

log = logging.getLogger("archnet_fx.workflow")

ARTIFACTS = ("model.onnx", "report.md", "report.json", "block_loss.png", "latency_by_kind.png")


def _json_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    return str(v)


def export_summary(rep: Any) -> dict[str, Any]:
    """The checked export as data (an :class:`~archnet_fx.export.onnx.ExportReport`)."""
    ex = rep.exactness
    return {"path": str(rep.path), "opset": rep.opset, "inputs": list(rep.input_names),
            "outputs": list(rep.output_names), "op_counts": dict(rep.op_counts),
            "checked_in_onnxruntime": rep.checked, "max_abs_diff": rep.max_abs_diff,
            "batch_sizes_run": list(rep.batch_sizes), "dynamic_batch": rep.dynamic_batch,
            "sequence_lengths_run": list(rep.seq_lengths),
            "integer_exact": None if ex is None else str(ex).splitlines()[0] if str(ex) else None}


def _png(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_block_loss(report: Any, path: Path) -> Path | None:
    """Per-block distillation loss before/after training (log scale)."""
    plt = _pyplot()
    blocks = [b for b in report.distill.blocks if b.loss_before is not None]
    if plt is None or not blocks:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(blocks) + 2), 3.6))
    xs = range(len(blocks))
    w = 0.4
    ax.bar([x - w / 2 for x in xs], [max(b.loss_before, 1e-12) for b in blocks], w,
           label="before training (calibrated)")
    ax.bar([x + w / 2 for x in xs], [max(b.loss_after or b.loss_before, 1e-12) for b in blocks],
           w, label="after training")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [b.name for b in blocks], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("block loss (normalised MSE)")
    ax.set_title(f"distillation per block, {report.target} {report.bits_label}")
    ax.legend(fontsize=8)
    try:
        return _png(fig, path)
    finally:
        plt.close(fig)


def plot_latency_by_kind(before: Any, after: Any, path: Path, top: int = 12) -> Path | None:
    """Estimated time per op kind, original vs result (horizontal bars, µs)."""
    plt = _pyplot()
    if plt is None:
        return None
    a, b = before.by_kind(), after.by_kind()
    kinds = sorted(set(a) | set(b), key=lambda k: -max(a.get(k, {}).get("time_s", 0),
                                                       b.get(k, {}).get("time_s", 0)))[:top]
    if not kinds:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(kinds) + 1.6))
    ys = range(len(kinds))
    h = 0.4
    ax.barh([y - h / 2 for y in ys], [1e6 * a.get(k, {}).get("time_s", 0) for k in kinds], h,
            label=f"original ({1e6 * before.total_s:.0f} µs)")
    ax.barh([y + h / 2 for y in ys], [1e6 * b.get(k, {}).get("time_s", 0) for k in kinds], h,
            label=f"transformed ({1e6 * after.total_s:.0f} µs)")
    ax.set_yticks(list(ys), kinds, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("estimated time (µs)")
    ax.set_title(f"latency by op kind on {after.target}, {after.bits_label}")
    ax.legend(fontsize=8)
    try:
        return _png(fig, path)
    finally:
        plt.close(fig)


def plot_selection_front(sel: Any, path: Path) -> Path | None:
    """The selection's predicted front (latency vs summed fidelity cost) and its choice."""
    plt = _pyplot()
    if plt is None or sel is None:
        return None
    pts = sel.front()
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.plot([1e6 * p[0] for p in pts], [max(p[1], 1e-9) for p in pts], "o-", ms=4,
            label="ILP optimum per budget (predicted)")
    ax.plot([1e6 * sel.predicted_s], [max(sel.objective, 1e-9)], "r*", ms=12, label="chosen")
    ax.axvline(1e6 * sel.original_s, color="gray", ls="--", lw=1, label="original")
    ax.set_yscale("log")
    ax.set_xlabel("predicted latency (µs)")
    ax.set_ylabel("summed fidelity cost (output nMSE)")
    ax.set_title("hardware-aware selection")
    ax.legend(fontsize=8)
    try:
        return _png(fig, path)
    finally:
        plt.close(fig)


def write_reports(out_dir: str | Path, *, name: str, command: str, result: Any, export: Any,
                  latency_before: Any, latency_after: Any, calibration: str,
                  stage_seconds: dict[str, float]) -> dict[str, Path]:
    """``report.md``, ``report.json`` and the PNGs into ``out_dir`` (``model.onnx`` is already
    there: the export wrote it). Returns name → path of what was written."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    rep = result.report
    figs = {"block_loss.png": plot_block_loss(rep, out / "block_loss.png"),
            "latency_by_kind.png": plot_latency_by_kind(latency_before, latency_after,
                                                        out / "latency_by_kind.png")}
    if getattr(rep, "selection", None) is not None:
        figs["selection_front.png"] = plot_selection_front(rep.selection,
                                                           out / "selection_front.png")
    missing_figs = [k for k, v in figs.items() if v is None]
    if missing_figs:
        log.warning("figures not drawn (%s): install matplotlib (pip install -c constraints.txt "
                    "-e '.[plot]')", ", ".join(missing_figs))
    written.update({k: v for k, v in figs.items() if v is not None})
    a, b = latency_before.summary(), latency_after.summary()
    data = {"model": name, "command": command, "calibration": calibration,
            "transform": rep.to_dict(), "export": export_summary(export),
            "latency": {"original": a, "transformed": b,
                        "speedup": latency_before.total_s / latency_after.total_s
                        if latency_after.total_s > 0 else None,
                        "by_kind_original": latency_before.by_kind(),
                        "by_kind_transformed": latency_after.by_kind()},
            "stage_seconds": stage_seconds, "figures": sorted(written)}
    written["report.json"] = atomic_write_text(out / "report.json",
                                               json.dumps(_json_safe(data), indent=2) + "\n")
    written["report.md"] = atomic_write_text(out / "report.md", _markdown(
        name, command, calibration, rep, export, latency_before, latency_after, stage_seconds,
        sorted(k for k in written if k.endswith(".png")), missing_figs))
    return written


def _markdown(name: str, command: str, calibration: str, rep: Any, export: Any, before: Any,
              after: Any, stage_seconds: dict[str, float], figs: list[str],
              missing_figs: list[str]) -> str:
    from tabulate import tabulate

    a, b = before.summary(), after.summary()
    lat = tabulate(
        [(label, f"{a[k]:.1f}", f"{b[k]:.1f}") for k, label in (
            ("total_us", "total µs"), ("chip_us", "on the chip µs"),
            ("fallback_us", "host fallback µs"), ("io_us", "link I/O µs"))]
        + [("kernels", a["kernels"], b["kernels"])],
        headers=["", f"original ({before.bits_label})", f"transformed ({after.bits_label})"],
        tablefmt="github")
    parts = [
        f"# {name} → {rep.target}, {rep.bits_label}",
        f"Command: `{command}`",
        f"Calibration data: {calibration}",
        "## Transform\n\n```text\n" + rep.table() + "\n```",
        f"## Estimated latency on {rep.target} (batch 1)\n\n{lat}\n\nspeed-up "
        f"{before.total_s / after.total_s:.2f}× (estimates of archnet_fx's cost model; "
        "`archnet-fx bench` prints every kind and node)",
        "## Export\n\n```text\n" + str(export) + "\n```",
        "## Time per stage\n\n" + tabulate([(k, f"{v:.1f}") for k, v in stage_seconds.items()],
                                          headers=["stage", "s"], tablefmt="github"),
    ]
    if figs:
        parts.append("## Figures\n\n" + "\n\n".join(f"![{f}]({f})" for f in figs))
    if missing_figs:
        parts.append(f"Figures not drawn ({', '.join(missing_figs)}): matplotlib is not "
                     "installed.")
    return "\n\n".join(parts) + "\n"
