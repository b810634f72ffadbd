"""Probe for issue 14: does blockwise distillation lower the loss at smaller learning rates?

The demo's setting (the real all-MiniLM-L6-v2, W8A8 npu_a, ``--sentences`` sentences of
lee_background.cor in batches of 16, the last batch held out, ``--steps`` steps per block,
progressive mode) run with the default learning rates scaled by each ``--scales`` factor. Per
run: how many blocks end with "training raised the loss" (the restore-if-worse safety net
fired), the mean relative change of the block losses (after / before, on the evaluation
batches), the held-out cosine of the distilled model's outputs against the original, and the
time.

    python benchmarks/distill_lr_probe.py                      # scales 1, 0.1, 0.01
    python benchmarks/distill_lr_probe.py --scales 1 0.03 --steps 8

Prints a table and writes ``benchmarks/results/distill_lr_probe.json`` atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import archnet_fx as ax  # noqa: E402
from archnet_fx.demo import data, zoo  # noqa: E402
from archnet_fx.infra.instruments import atomic_write_text  # noqa: E402
from archnet_fx.train.distill import DistillOptions  # noqa: E402

DEFAULT_LR = {f: DistillOptions.__dataclass_fields__[f].default
              for f in ("lr_surrogate", "lr_weight", "lr_quant")}


def run(scale: float, sentences: int, steps: int) -> dict:
    model, _ = zoo.get_model("minilm")
    enc = zoo.encode_sentences(data.lee_background_sentences()[:sentences])
    batches = [{k: v[i:i + 16] for k, v in enc.items()} for i in range(0, sentences, 16)]
    lrs = {k: v * scale for k, v in DEFAULT_LR.items()}
    t0 = time.perf_counter()
    res = ax.transform(model, "npu_a", batches[0], batches, steps=steps, holdout=1,
                       progress=False, verify=False, **lrs)
    seconds = time.perf_counter() - t0
    blocks = res.report.distill.blocks
    raised = sum("raised the loss" in (b.note or "") for b in blocks)
    ratios = [b.loss_after / b.loss_before for b in blocks
              if b.loss_before and b.loss_after is not None]
    cos = [r["cosine"] for r in res.report.fidelity_of("distilled")]
    return {"scale": scale, **lrs, "steps": steps, "blocks": len(blocks), "raised": raised,
            "mean_after_over_before": sum(ratios) / max(1, len(ratios)),
            "cosine": cos, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.1, 0.01])
    ap.add_argument("--sentences", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for s in args.scales:
        torch.manual_seed(0)
        rows.append(run(s, args.sentences, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    print(tabulate([(r["scale"], r["lr_weight"], f"{r['raised']}/{r['blocks']}",
                     f"{r['mean_after_over_before']:.4f}",
                     " / ".join(f"{c:.5f}" for c in r["cosine"]), f"{r['seconds']:.0f}")
                    for r in rows],
                   headers=["lr scale", "lr_weight", "blocks 'raised the loss'",
                            "mean loss after/before", "held-out cosine", "s"],
                   tablefmt="github"))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    atomic_write_text(Path(__file__).parent / "results" / "distill_lr_probe.json",
                      json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
