"""Deployment matrix: every zoo model × every built-in target × every bit width it allows,
transformed (a few distillation steps), exported, and checked integer by integer.

For each cell: ``archnet_fx.transform`` (``--steps`` steps per block on ``--batches`` random
calibration batches of the model's example shape), then ``archnet_fx.export_onnx`` — which
runs the file in onnxruntime at batch 1, the example's batch and 8, and compares every
QuantizeLinear's integers with the torch module's (fed the same upstream integers) and with the
integer reference (:mod:`archnet_fx.export.verify`). The table gives, per cell:

* ``batches``: the batch sizes the file ran at;
* ``lengths``: for sequence models (token-id inputs, transformed with ``max_seq_len`` = the
  example's length), the sequence lengths the file ran at and was integer-checked at;
* ``integers``: how many quantized integers were compared (example batch, every length);
* ``torch≠ORT``: how many differ between torch and onnxruntime (local), and the largest
  difference in steps — the export check allows one-step flips on ≤ 1 % of them (float
  summation order at a rounding boundary);
* ``intref≠ORT``: likewise for the integer reference (integer kernels, fixed-point
  requantization, half-up rounding);
* ``propagated``: share of integers that differ when each runtime runs on its own end to end
  (one early flip moves later integers; not an export error, reported for scale).

A cell that raises prints the error type and message and counts as a failure (exit status 1).

    python benchmarks/export_matrix.py                    # everything (~3–6 min on 2 cores)
    python benchmarks/export_matrix.py --models mlp vit --targets npu_a

Writes ``benchmarks/results/export_matrix.json`` atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import archnet_fx as ax  # noqa: E402
from archnet_fx.demo import zoo  # noqa: E402

MODELS = ["mlp", "cnn", "vit", "bert_tiny", "decoder"]


def _batches(model_name: str, n: int, seed: int) -> list:
    """``n`` calibration batches shaped like the model's example: floats redrawn, token ids
    drawn from 1 up to the example's largest id, masks kept."""
    g = torch.Generator().manual_seed(seed)

    def redraw(key, v):
        if not isinstance(v, torch.Tensor):
            return v
        if v.is_floating_point():
            return torch.randn(v.shape, generator=g)
        if key in ("input_ids", 0) and v.numel():
            return torch.randint(1, int(v.max()) + 1, v.shape, generator=g)
        return v
    out = []
    for _ in range(n):
        _, ex = zoo.get_model(model_name, batch_size=4)
        if isinstance(ex, dict):
            out.append({k: redraw(k, v) for k, v in ex.items()})
        else:
            ex = ex if isinstance(ex, tuple) else (ex,)
            out.append(tuple(redraw(i, v) for i, v in enumerate(ex)))
    return out


def _seq_len(ex) -> int | None:
    """The example's sequence length for models with token-id inputs (None otherwise)."""
    vals = list(ex.values()) if isinstance(ex, dict) else list(ex if isinstance(ex, tuple)
                                                                 else (ex,))
    return next((int(v.shape[1]) for v in vals if isinstance(v, torch.Tensor) and v.dim() == 2
                 and not v.is_floating_point()), None)


def run_cell(name: str, target: str, w_bits: int, steps: int, n_batches: int,
             out_dir: Path) -> dict:
    torch.manual_seed(0)
    model, ex = zoo.get_model(name, batch_size=4)
    t0 = time.perf_counter()
    seq = _seq_len(ex)
    res = ax.transform(model, target, ex, _batches(name, n_batches, 1), weight_bits=w_bits,
                       steps=steps, holdout=1, progress=False, max_seq_len=seq)
    t_tr = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = ax.export_onnx(res, out_dir / f"{name}_{target}_w{w_bits}.onnx")
    t_ex = time.perf_counter() - t0
    e = rep.exactness
    for r in rep.seq_exactness.values():     # the other lengths' integers count too
        if r is not e:
            e.torch_local.elements += r.torch_local.elements
            e.torch_local.differ += r.torch_local.differ
            e.torch_local.max_steps = max(e.torch_local.max_steps, r.torch_local.max_steps)
            e.intref_local.elements += r.intref_local.elements
            e.intref_local.differ += r.intref_local.differ
            e.intref_local.max_steps = max(e.intref_local.max_steps, r.intref_local.max_steps)
    cos = [r["cosine"] for r in res.report.fidelity_of("distilled")]
    return {"model": name, "target": target, "bits": f"W{w_bits}A{res.report.act_bits}",
            "opset": rep.opset, "batches": rep.batch_sizes, "lengths": rep.seq_lengths,
            "q_nodes": e.q_nodes,
            "integers": e.torch_local.elements, "torch_differ": e.torch_local.differ,
            "torch_max_steps": e.torch_local.max_steps, "intref_differ": e.intref_local.differ,
            "intref_max_steps": e.intref_local.max_steps,
            "propagated_fraction": e.torch_propagated.fraction,
            "output_max_abs_diff": e.output_max_abs_diff,
            "cosine_vs_original": min(cos) if cos else None,
            "transform_s": t_tr, "export_s": t_ex, "ok": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=list(zoo.MODELS))
    ap.add_argument("--targets", nargs="+", default=ax.list_targets())
    ap.add_argument("--steps", type=int, default=2, help="distillation steps per block "
                    "(default 2)")
    ap.add_argument("--batches", type=int, default=3, help="calibration batches (default 3)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for target in args.targets:
                for w in ax.load_target(target).quant.weight_bits:
                    try:
                        r = run_cell(name, target, w, args.steps, args.batches, Path(tmp))
                    except Exception as exc:  # noqa: BLE001 - a failed cell is reported
                        failures += 1
                        r = {"model": name, "target": target, "bits": f"W{w}", "ok": False,
                             "error": f"{type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())[:300]}"}
                    rows.append(r)
                    print(json.dumps({k: v for k, v in r.items()}, default=str), flush=True)
    table = []
    for r in rows:
        if not r["ok"]:
            table.append((r["model"], r["target"], r["bits"], "FAILED", "", r["error"][:60],
                          "", "", "", ""))
            continue
        table.append((r["model"], r["target"], r["bits"], ",".join(map(str, r["batches"])),
                      ",".join(map(str, r["lengths"])) or "fixed", f"{r['integers']:,}",
                      f"{r['torch_differ']} ({r['torch_differ'] / max(1, r['integers']):.1e})"
                      f", max {r['torch_max_steps']}",
                      f"{r['intref_differ']} ({r['intref_differ'] / max(1, r['integers']):.1e})"
                      f", max {r['intref_max_steps']}",
                      f"{r['propagated_fraction']:.1e}",
                      f"{r['transform_s'] + r['export_s']:.1f}"))
    print()
    print(tabulate(table, headers=["model", "target", "bits", "batches", "lengths", "integers",
                                   "torch≠ORT (local)", "intref≠ORT (local)", "propagated",
                                   "s"], tablefmt="github"))
    n_int = sum(r.get("integers", 0) for r in rows)
    n_diff = sum(r.get("torch_differ", 0) for r in rows)
    print(f"\n{len(rows) - failures}/{len(rows)} cells ran; torch vs onnxruntime: {n_diff} of "
          f"{n_int:,} integers differ ({n_diff / max(1, n_int):.2e}), by at most "
          f"{max((r.get('torch_max_steps', 0) for r in rows), default=0)} step(s); "
          f"load average at end: {os.getloadavg()[0]:.2f}")
    out = Path(__file__).parent / "results" / "export_matrix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmpf = tempfile.mkstemp(dir=out.parent, prefix=".export_matrix.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(rows, f, indent=1, default=str)
    os.replace(tmpf, out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
