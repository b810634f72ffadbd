"""Does distillation learn? Every figure of issue 14 in one run (default settings first).

Each run is a real ``archnet_fx.transform`` of all-MiniLM-L6-v2 → npu_a on the first ``N``
sentences of gensim's ``lee_background.cor`` (batches of 16; the library's default ``holdout``
keeps the last 10 % of them out of training), then scored on the *last* 256 sentences of the
file, which no run ever calibrates on:

* held-out sentence cosine: mean-pooled embeddings of the student vs the original (mean, min);
* the three fidelity stages of the report (legalized float, quantized before distillation,
  distilled; token-level, on the held-out calibration batches);
* every block's held-out loss before → after training, and its note;
* wall time of the ``transform`` call, the load average around it, and the process's peak RSS
  (each run is its own subprocess, so RSS is that run's).

Runs (``--runs``; all by default):

``w8a8``        default W8A8, 1,024 sentences, default options (one epoch of steps per block)
``w4a8``        default W4A8 (default candidates), 1,024 sentences
``structural``  ``prefer="structural"`` (Arch-Net's forms: LayerNorm → affine, GELU → ReLU form,
                softmax → ReLU attention), 2,048 sentences, default options
``rss2048``     default W8A8 with 2,048 sentences (peak memory)
``ablation``    W8A8, 256 sentences: the recipe of issue 14 against the one before it
                (``per_element=False, warmup=0, lr_weight=2e-3``) and each change alone
``zoo``         the small zoo models of the tests, W8A8 and W4A8 on npu_a, random inputs
``vit``         ``distill_vit.py``: W2A4 on the low-bit target, progressive, seeds 0 1 2,
                library learning rates

    python benchmarks/distill_recipe.py                       # everything (~1 hour here)
    python benchmarks/distill_recipe.py --runs w8a8 ablation  # some

Results are cached per run in ``benchmarks/results/distill_recipe.json`` (written atomically
after each run; ``--fresh`` redoes them), so an interrupted benchmark resumes. Never run two
benchmarks at once on this 2-core machine: the timings would be worthless.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "distill_recipe.json"
EVAL_SENTENCES = 256
OLD_RECIPE = dict(per_element=False, warmup=0.0, lr_weight=2e-3)

RUNS = {
    "w8a8": [dict(name="W8A8 default", n=1024, w=8, a=8, kw={})],
    "w4a8": [dict(name="W4A8 default", n=1024, w=4, a=8, kw={})],
    "structural": [dict(name="W8A8 prefer=structural", n=2048, w=8, a=8,
                        kw=dict(prefer="structural", select="order"))],
    "rss2048": [dict(name="W8A8 default, 2048 sentences", n=2048, w=8, a=8, kw={})],
    "ablation": [
        dict(name="ablation: recipe of issue 14", n=256, w=8, a=8, kw={}),
        dict(name="ablation: recipe before (per-tensor rates, no warm-up, lr_weight 2e-3)",
             n=256, w=8, a=8, kw=OLD_RECIPE),
        dict(name="ablation: before + per-element rates", n=256, w=8, a=8,
             kw=dict(warmup=0.0, lr_weight=2e-3)),
        dict(name="ablation: before + warm-up", n=256, w=8, a=8,
             kw=dict(per_element=False, lr_weight=2e-3)),
        dict(name="ablation: before + lr_weight 5e-4", n=256, w=8, a=8,
             kw=dict(per_element=False, warmup=0.0)),
    ],
}


# --------------------------------------------------------------------------- one run


def one(spec: dict) -> dict:
    """One MiniLM transform (in this process); the row of results."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from archnet_fx.demo import data, zoo
    from archnet_fx.transform import transform
    from distill_minilm import batched, cosines, embed

    sents = data.lee_background_sentences()
    calib = batched(zoo.encode_sentences(sents[:spec["n"]]), 16)
    held = batched(zoo.encode_sentences(sents[len(sents) - EVAL_SENTENCES:]), 32)
    model, _ = zoo.get_model("minilm")
    ref = embed(lambda b: model(**b), held)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    res = transform(model, "npu_a", calib[0], calib, weight_bits=spec["w"], act_bits=spec["a"],
                    verify=False, progress=False, **spec["kw"])
    secs = time.perf_counter() - t0
    load1 = os.getloadavg()
    cos = cosines(embed(lambda b: res.module(**b), held), ref)
    rep = res.report
    return {
        **spec, "seconds": secs, "load_before": load0, "load_after": load1,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "heldout_mean_cos": float(cos.mean()), "heldout_min_cos": float(cos.min()),
        "stages": rep.fidelity, "stage_seconds": rep.seconds,
        "blocks": [dict(name=b.name, steps=b.steps, before=b.loss_before, after=b.loss_after,
                        note=b.note) for b in rep.distill.blocks],
        "threads": torch.get_num_threads(),
    }


def zoo_rows() -> list[dict]:
    """Small zoo models (random inputs, 12 batches of 8: 11 train, 1 held out), W8A8 / W4A8."""
    from archnet_fx.demo import zoo
    from archnet_fx.transform import transform

    rows = []
    for name in ("mlp", "cnn", "cnn_gelu", "transformer", "vit", "bert_tiny"):
        model, ex = zoo.get_model(name)
        batches = zoo.random_batches(name, 12, 8, seed=0)
        for w in (8, 4):
            res = transform(model, "npu_a", ex, batches, weight_bits=w, act_bits=8,
                            holdout=1, progress=False, verify=False)
            rows.append({"model": name, "w": w, "blocks": [
                dict(name=b.name, steps=b.steps, before=b.loss_before, after=b.loss_after,
                     note=b.note) for b in res.report.distill.blocks]})
    return rows


def vit_rows(tmp: Path) -> dict:
    out = tmp / "vit.json"
    cmd = [sys.executable, str(HERE / "distill_vit.py"), "--configs", "2,4", "--modes",
           "progressive", "--steps", "300", "--transform-seeds", "0", "1", "2",
           "--lr-weight", "5e-4", "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    d = json.loads(out.read_text())
    return {"teacher_top1": d["teacher_top1"], "summary": d["summary"], "runs": d.get("runs")}


# --------------------------------------------------------------------------- report


def _f(v, fmt="{:.4g}"):
    return "—" if v is None else fmt.format(v)


def print_report(results: dict) -> None:
    from tabulate import tabulate

    rows = [r for k in RUNS for r in results.get(k, [])]
    if rows:
        print("\nall-MiniLM-L6-v2 → npu_a, default options unless named; held-out = the last "
              f"{EVAL_SENTENCES} sentences of lee_background.cor (never calibrated on)\n")
        print(tabulate([(r["name"], r["n"], f"{r['heldout_mean_cos']:.4f}",
                         f"{r['heldout_min_cos']:.4f}", f"{r['seconds']:.0f}",
                         f"{r['load_before'][0]:.1f}/{r['load_after'][0]:.1f}",
                         f"{r['peak_rss_gb']:.2f}",
                         sum(1 for b in r["blocks"] if b["after"] is not None
                             and b["after"] < b["before"]), len(r["blocks"]),
                         sum("raised" in b["note"] for b in r["blocks"]))
                        for r in rows],
                       headers=["run", "sentences", "held-out mean cos", "min cos",
                                "transform s", "load 1-min before/after", "peak RSS GB",
                                "blocks improved", "blocks", "'raised' notes"],
                       tablefmt="github"))
        for r in rows:
            print(f"\n{r['name']}: fidelity stages (token level, held-out calibration batches)")
            print(tabulate([(s["stage"], s["output"], f"{s['cosine']:.5f}", f"{s['nmse']:.4g}")
                            for s in r["stages"]],
                           headers=["stage", "output", "mean cosine", "nMSE"],
                           tablefmt="github"))
            print(tabulate([(b["name"], b["steps"], _f(b["before"]), _f(b["after"]),
                             _f(b["after"] / b["before"] if b["before"] else None, "{:.3f}"),
                             b["note"]) for b in r["blocks"]],
                           headers=["block", "steps", "held-out loss before", "after",
                                    "after/before", "note"], tablefmt="github"))
    if results.get("zoo"):
        print("\nzoo models (tests' models, random inputs, default options, 1 held-out batch)")
        print(tabulate([(z["model"], f"W{z['w']}A8", len(z["blocks"]),
                         sum(1 for b in z["blocks"] if b["after"] is not None
                             and b["after"] < b["before"]),
                         "; ".join(f"{b['name']}: {b['note']}" for b in z["blocks"] if b["note"]))
                        for z in results["zoo"]],
                       headers=["model", "bits", "blocks", "improved on held-out", "notes"],
                       tablefmt="github"))
    if results.get("vit"):
        v = results["vit"]
        print(f"\nViT (distill_vit.py) W2A4 on npu_a_lowbit, progressive, library rates; "
              f"teacher top-1 {v['teacher_top1']:.2f}")
        print(tabulate([(s["config"], s["mode"], s["steps"], f"{s['mean_student_top1']:.2f}",
                         f"{s['mean_delta']:+.2f}", f"{s['worst_delta']:+.2f}",
                         f"{s['within_0.5']}/{len(s['seeds'])}") for s in v["summary"]],
                       headers=["config", "mode", "steps/block", "mean top-1", "mean Δ",
                                "worst Δ", "within 0.5"], tablefmt="github"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="*", default=list(RUNS) + ["zoo", "vit"],
                   choices=list(RUNS) + ["zoo", "vit"])
    p.add_argument("--fresh", action="store_true", help="redo runs already in the results")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run spec as JSON
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return 0
    import logging
    import tempfile

    from archnet_fx.infra.instruments import atomic_write_text

    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    for key in args.runs:
        if key in results:
            print(f"{key}: cached in {out} (--fresh redoes it)", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        if key == "zoo":
            results[key] = zoo_rows()
        elif key == "vit":
            with tempfile.TemporaryDirectory() as tmp:
                results[key] = vit_rows(Path(tmp))
        else:
            rows = []
            for spec in RUNS[key]:
                r = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                                   check=True, capture_output=True, text=True)
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(f"  {spec['name']}: held-out cos {rows[-1]['heldout_mean_cos']:.4f}, "
                      f"{rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
            results[key] = rows
        atomic_write_text(out, json.dumps(results, indent=1, default=str))
        print(f"{key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print_report({k: v for k, v in results.items() if k in args.runs})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
