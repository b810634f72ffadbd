"""Hardware-aware selection on all-MiniLM-L6-v2 → npu_a: the measured options and a sweep of
latency budgets (issue 18, first part).

One measurement (``archnet_fx.selection.select`` with an on-disk cache: every candidate of every
replaced node fitted locally on the original's inputs at its node, swapped alone into the
original, held-out output nMSE and cost-model latency), then for each budget of a sweep from the
most faithful choice's predicted latency down to the fastest achievable (plus ``min_fidelity``
points): the ILP's predicted latency, the assembled network's estimate (the error of the
additive model), the assembled *float* network's held-out mean cosine (before quantization and
distillation), and the candidate counts per kind. The whole pipeline per budget (quantized,
distilled, exported, timed in onnxruntime against fp32 and ORT's dynamic int8) is
``python benchmarks/ort_minilm.py --configs hant --calib 512``.

    python benchmarks/hant_select.py                 # 512 sentences (~10 min here)
    python benchmarks/hant_select.py --sentences 256 --points 6
    python benchmarks/hant_select.py --tokens 16 --out hant_select_16tok.json  # short inputs

Weight widths are chosen per layer too (npu_a: W4 or W8). A W4A8 layer runs at the int8 rate on
npu_a, so W4 only speeds up memory-bound layers: at 128 tokens only the pooler is one; with
``--tokens 16`` (short queries) every layer is, and the sweep trades W4 layers against
surrogates.

Writes ``benchmarks/results/hant_select.json``; the measurement is cached under
``benchmarks/results/hant_cache/`` (a rerun with the same model, data and recipe skips it).
Held-out = the last 64 of the calibration sentences' batches (``holdout`` of the selection).
Never run two benchmarks at once on this 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--points", type=int, default=6, help="budgets in the sweep")
    p.add_argument("--tokens", type=int, default=128, help="tokens per sentence (padded)")
    p.add_argument("--out", default="hant_select.json", help="file name under results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("archnet_fx.progress").setLevel(logging.INFO)
    import torch
    from tabulate import tabulate

    from archnet_fx.demo import data, zoo
    from archnet_fx.errors import ArchnetError
    from archnet_fx.pipelines import as_graph_module
    from archnet_fx.selection import SelectOptions, select

    torch.manual_seed(0)
    model, _ = zoo.get_model("minilm")
    enc = zoo.encode_sentences(data.lee_background_sentences()[:args.sentences],
                               max_length=args.tokens)
    bs = 16
    batches = [((), {k: v[i:i + bs] for k, v in enc.items()})
               for i in range(0, args.sentences, bs)]
    held_n = max(1, 64 // bs)
    train, held = batches[:-held_n], batches[-held_n:]
    teacher = as_graph_module(model, batches[0][1], "auto")
    cache = RESULTS / "hant_cache"
    load0 = os.getloadavg()[0]

    def run(**kw):
        t0 = time.perf_counter()
        sel = select(teacher, "npu_a", batches[0][1], train, held,
                     options=SelectOptions(cache_dir=cache, **kw), weight_bits=8, act_bits=8)
        return sel, time.perf_counter() - t0

    first, first_s = run(min_fidelity=0.99)
    front = first.front(points=40)
    lo, hi = front[0][0], front[-1][0]
    budgets = [hi - (hi - lo) * i / max(args.points - 1, 1) for i in range(args.points)]
    rows, out = [], {"sentences": args.sentences, "tokens": args.tokens,
                     "held_out_sentences": held_n * bs,
                     "measure_s": first.measure_s, "first_call_s": first_s,
                     "original_us": first.original_s * 1e6,
                     "default_us": first.default_s * 1e6, "points": []}
    settings = [dict(latency_budget=b * (1 + 1e-6)) for b in budgets] + [
        dict(min_fidelity=f) for f in (0.99, 0.98, 0.95)]
    for kw in settings:
        try:
            sel, secs = run(**kw)
        except ArchnetError as e:
            rows.append((kw, "infeasible", "", "", "", "", str(e)[:60]))
            continue
        counts = sel.changed()
        point = {"setting": {k: v for k, v in kw.items()}, "predicted_us": sel.predicted_s * 1e6,
                 "assembled_us": sel.assembled_s * 1e6,
                 "speedup_vs_original": sel.original_s / sel.assembled_s,
                 "float_cosine": sel.assembled_cosine, "objective": sel.objective,
                 "call_s": secs, "changed": dict(counts)}
        out["points"].append(point)
        label = (f"budget {kw['latency_budget'] * 1e6:.0f} µs" if "latency_budget" in kw
                 else f"min_fidelity {kw['min_fidelity']}")
        rows.append((label, f"{point['predicted_us']:.0f}", f"{point['assembled_us']:.0f}",
                     f"{point['speedup_vs_original']:.2f}x", f"{sel.assembled_cosine:.4f}",
                     f"{secs:.0f}", ", ".join(f"{k}×{v}" for k, v in sorted(counts.items()))
                     or "defaults (+ host lookups)"))
    out["load_avg_1min"] = [load0, os.getloadavg()[0]]
    print(f"\nall-MiniLM-L6-v2 → npu_a A8, weights W8 or W4 per layer, {args.sentences} sentences "
          f"({held_n * bs} held out); original {first.original_s * 1e6:.0f} µs, default "
          f"candidates {first.default_s * 1e6:.0f} µs (batch 1 × {args.tokens}); measurement "
          f"{first.measure_s:.0f} s, "
          f"load {load0:.1f}→{os.getloadavg()[0]:.1f}\n")
    print(tabulate(rows, headers=["setting", "ILP predicted µs", "assembled µs",
                                  "vs original", "float cos (held out)", "call s",
                                  "non-default choices"], tablefmt="github"))
    RESULTS.mkdir(exist_ok=True)
    from archnet_fx.infra.instruments import atomic_write_text
    atomic_write_text(RESULTS / args.out, json.dumps(out, indent=2, default=str))
    print(f"\nresults: {RESULTS / args.out}")


if __name__ == "__main__":
    main()
