"""Initial fidelity of legalization (before any training) on the real all-MiniLM-L6-v2.

For each target and each candidate choice, legalize MiniLM (ranges calibrated on sentences from
gensim's ``lee_background.cor``), embed *other* sentences of the same corpus (mean pooling over
the attention mask, as sentence-transformers does) and report the mean / min cosine to the
original model's embeddings, plus the Spearman correlation with the human similarity ratings of
``lee.cor`` (``similarities0-1.txt``) next to the original's.

    python benchmarks/legalize_fidelity.py                 # all targets, all choices
    python benchmarks/legalize_fidelity.py --targets npu_a --sentences 128

Prints a table and writes ``benchmarks/results/legalize_fidelity.json`` (atomically).
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

import archnet_fx as ax  # noqa: E402
from archnet_fx.demo import data, zoo
from archnet_fx.infra.instruments import atomic_write_text

CHOICES = {
    "emulation (default)": dict(prefer="emulation"),
    "structural everywhere": dict(prefer="structural"),
    "structural layer_norm only": dict(choices={"layer_norm": "structural"}),
    "structural softmax only": dict(choices={"softmax": "structural"}),
    "structural gelu only": dict(choices={"gelu": "structural"}),
}


def embed(model, batches) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for b in batches:
            out = model(**b)
            h = out["last_hidden_state"] if isinstance(out, dict) or hasattr(out, "keys") \
                else out[0]
            outs.append(zoo.mean_pool(h, b["attention_mask"]))
    return torch.cat(outs)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def similarity_score(model, docs_batches, pairs) -> float:
    e = torch.nn.functional.normalize(embed(model, docs_batches), dim=-1)
    sims = torch.tensor([float(e[i] @ e[j]) for i, j, _ in pairs])
    human = torch.tensor([h for _, _, h in pairs])
    return spearman(sims, human)


def batched(enc: dict, size: int) -> list[dict]:
    n = enc["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in enc.items()} for i in range(0, n, size)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="*", default=["npu_a", "npu_b", "dsp_c"])
    p.add_argument("--calib", type=int, default=64, help="calibration sentences")
    p.add_argument("--sentences", type=int, default=256, help="evaluation sentences")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--choices", nargs="*", default=list(CHOICES))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "legalize_fidelity.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    sents = data.lee_background_sentences()
    calib_s = sents[:args.calib]
    eval_s = sents[args.calib:args.calib + args.sentences]
    calib = batched(zoo.encode_sentences(calib_s), args.batch)
    evalb = batched(zoo.encode_sentences(eval_s), args.batch)
    docs = batched(zoo.encode_sentences(data.lee_documents()), args.batch)
    pairs = data.lee_similarity_pairs()

    model, _ = zoo.get_model("minilm")
    ref = embed(model, evalb)
    ref_spearman = similarity_score(model, docs, pairs)
    print(f"all-MiniLM-L6-v2: {len(calib_s)} calibration sentences, {len(eval_s)} held-out "
          f"sentences (lee_background.cor); original Spearman on lee.cor = {ref_spearman:.4f}")

    rows, results = [], []
    for tgt in args.targets:
        for name in args.choices:
            t0 = time.perf_counter()
            try:
                res = ax.legalize(model, tgt, calib[0], calib_data=calib, verify=False,
                                  **CHOICES[name])
            except ax.ArchnetError as e:
                rows.append((tgt, name, "error", "", "", "", str(e).splitlines()[0]))
                continue
            secs = time.perf_counter() - t0
            got = embed(res.module, evalb)
            finite = torch.isfinite(got).all(-1)
            # An untrained structural model can overflow; report it rather than average NaNs.
            cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
            cos = torch.where(finite, cos, torch.full_like(cos, -1.0))
            sp = similarity_score(res.module, docs, pairs)
            if not finite.all():
                name = f"{name} [{int((~finite).sum())} non-finite → cos -1]"
            rep = res.after
            used = sorted(set(res.choices.values()))
            rows.append((tgt, name, f"{float(cos.mean()):.4f}", f"{float(cos.min()):.4f}",
                         f"{sp:.4f}", len(rep.unsupported), f"{secs:.1f}", ", ".join(used)))
            results.append(dict(target=tgt, choice=name, mean_cos=float(cos.mean()),
                                min_cos=float(cos.min()), spearman=sp,
                                spearman_original=ref_spearman,
                                unsupported_after=len(rep.unsupported),
                                host_fallback=sum(rep.host_fallback_counts.values()),
                                legalize_seconds=secs, candidates=used))
            print(f"  {tgt:6s} {name:28s} mean cos {float(cos.mean()):.4f}", file=sys.stderr)
    print(tabulate(rows, headers=["target", "choice", "mean cos", "min cos", "Spearman",
                                  "unsupported", "legalize s", "candidates used"],
                   tablefmt="github"))
    atomic_write_text(args.out, json.dumps(dict(original_spearman=ref_spearman,
                                                eval_sentences=len(eval_s),
                                                calib_sentences=len(calib_s),
                                                results=results), indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
