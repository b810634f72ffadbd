"""Estimated latency before and after legalization, every built-in target × four models.

Models (batch 1): the real all-MiniLM-L6-v2 (1 sentence × 128 tokens), the zoo's small ViT,
small CNN and LLaMA-style decoder (RMSNorm, SiLU/SwiGLU). For each target the original graph
is estimated as captured (unsupported nodes run on the host: fallback regions), then the graph
legalized with the default candidates (``allow_host_fallback=True, verify=False``), then —
where it changes anything — with ``select="latency"``: every node with a lossless candidate
(one-hot × linear, host-prologue lookup, const rows) tries the others and keeps the one with
the lower whole-graph estimate (a one-hot of a 30522-word vocabulary is a 3 Gop matmul over a
11.7 MB table plus a ``L × V`` upload; the host lookup sends ``L × D`` values instead), and
with Arch-Net's structural surrogates (``prefer="structural", select="latency"``: affine
LayerNorm, ReLU-form GELU, ReLU attention — all elementwise work that fuses into the
preceding kernel's epilogue, at a fidelity cost distillation has to win back).

    python benchmarks/latency.py                       # everything
    python benchmarks/latency.py --models minilm --targets npu_a

"max speed-up" is the original's ``LatencyReport.rewrite_bound_s`` ratio: the original's time
over its MAC work at the chip's peak plus one kernel overhead per MAC op — what a rewrite that
made every other op free (perfect fusion, no fallback) would reach. It says how much of a
speed-up target is reachable at all under the target's cost parameters.

Prints a table, writes ``benchmarks/results/latency.json`` (atomically) and, when matplotlib
(the ``plot`` extra) imports, ``benchmarks/results/latency_<model>_<target>.png`` (per-kind
time before/after) for MiniLM (``--plots all`` for every model).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import archnet_fx as ax  # noqa: E402
from archnet_fx.demo import zoo
from archnet_fx.infra.instruments import atomic_write_text
from archnet_fx.cost.latency import estimate_latency

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ["minilm", "vit", "cnn", "decoder"]
log = logging.getLogger("bench.latency")


def legalized_variants(gm, target):
    """[(label, LegalizeResult, LatencyReport)]: the default order, then — where it differs —
    ``legalize(..., select="latency")`` (lossless candidates chosen by the estimate), then
    Arch-Net's structural surrogates (``prefer="structural"``, with ``select="latency"``):
    per-channel affine LayerNorm, ReLU-form GELU, ReLU attention — coarse starts that
    distillation must refine, so they trade fidelity for speed (see ort_minilm.py)."""
    res = ax.legalize(gm, target, allow_host_fallback=True, verify=False)
    out = [("default", res, estimate_latency(res.module, target))]
    sel = ax.legalize(gm, target, allow_host_fallback=True, verify=False, select="latency")
    flipped = [f"{r['node']}→{r['candidate']}" for r in sel.selection if r["kept"]]
    if flipped:
        out.append((f"select=latency ({', '.join(flipped)})", sel,
                    estimate_latency(sel.module, target)))
    st = ax.legalize(gm, target, allow_host_fallback=True, verify=False, prefer="structural",
                     select="latency")
    if st.choices != sel.choices:
        out.append(("structural+select=latency", st, estimate_latency(st.module, target)))
    return out


def plot_kinds(before, after, title: str, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    kb, ka = before.by_kind(), after.by_kind()
    kinds = [k for k in dict.fromkeys(list(kb) + list(ka))
             if kb.get(k, {}).get("time_s", 0) + ka.get(k, {}).get("time_s", 0) > 0]
    kinds.sort(key=lambda k: -(kb.get(k, {}).get("time_s", 0) + ka.get(k, {}).get("time_s", 0)))
    kinds = kinds[:14]
    import numpy as np

    x = np.arange(len(kinds))
    fig, ax_ = plt.subplots(figsize=(10, 4.5))
    ax_.bar(x - 0.2, [kb.get(k, {}).get("time_s", 0) * 1e6 for k in kinds], 0.4,
            label=f"original ({before.total_s * 1e6:.0f} us)")
    ax_.bar(x + 0.2, [ka.get(k, {}).get("time_s", 0) * 1e6 for k in kinds], 0.4,
            label=f"legalized ({after.total_s * 1e6:.0f} us)")
    ax_.set_xticks(x, kinds, rotation=40, ha="right")
    ax_.set_ylabel("estimated us")
    ax_.set_title(title)
    ax_.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--targets", nargs="*", default=ax.list_targets())
    p.add_argument("--plots", choices=["minilm", "all", "none"], default="minilm")
    p.add_argument("--out", default=str(RESULTS / "latency.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    rows, results, plots = [], [], []
    t0 = time.perf_counter()
    for name in args.models:
        model, ex = zoo.get_model(name, batch_size=1)
        gm = ax.capture(model, ex)
        for tname in args.targets:
            t1 = time.perf_counter()
            before = estimate_latency(gm, tname)
            for label, res, after in legalized_variants(gm, tname):
                s0, s1 = before.summary(), after.summary()
                row = dict(target=tname, model=name, variant=label,
                           original_us=s0["total_us"], fallback_regions=s0["fallback_regions"],
                           fallback_share=s0["fallback_share"],
                           legalized_us=s1["total_us"],
                           legalized_regions=s1["fallback_regions"],
                           roofline_us=s1["roofline_us"],
                           ratio_to_roofline=s1["ratio_to_roofline"],
                           speedup=before.total_s / after.total_s,
                           max_speedup=s0["max_rewrite_speedup"],
                           kernels=s1["kernels"])
                rows.append(row)
                results.append(dict(row, original=before.to_dict(nodes=False),
                                    legalized=after.to_dict(nodes=False),
                                    choices=res.choices))
                if args.plots == "all" or (args.plots == "minilm" and name == "minilm"):
                    suffix = "" if label == "default" else \
                        "_structural" if label.startswith("structural") else "_select_latency"
                    path = plot_kinds(before, after, f"{name} on {tname} ({label})",
                                      RESULTS / f"latency_{name}_{tname}{suffix}.png")
                    if path:
                        plots.append(str(path))
            print(f"  {name} on {tname}: {time.perf_counter() - t1:.1f} s", file=sys.stderr,
                  flush=True)

    headers = ["target", "model", "variant", "original us", "fallback regions",
               "fallback share", "legalized us", "regions after", "roofline us",
               "ratio to roofline", "speed-up", "max speed-up", "kernels"]
    table = [(r["target"], r["model"], r["variant"][:40], r["original_us"],
              r["fallback_regions"], f"{100 * r['fallback_share']:.1f} %", r["legalized_us"],
              r["legalized_regions"], r["roofline_us"], r["ratio_to_roofline"], r["speedup"],
              r["max_speedup"], r["kernels"]) for r in rows]
    print(tabulate(table, headers=headers, tablefmt="github", floatfmt=".2f"))
    out = atomic_write_text(args.out, json.dumps(dict(rows=results, plots=plots), indent=1,
                                                 default=str))
    print(f"\nwrote {out}" + (f" and {len(plots)} plot(s)" if plots else "")
          + f" in {time.perf_counter() - t0:.1f} s")
    if not plots and args.plots != "none":
        print("no bar charts: matplotlib is not installed (pip install -c constraints.txt "
              "-e '.[plot]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
