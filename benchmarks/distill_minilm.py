"""Distillation + fake quantization of the real all-MiniLM-L6-v2 for npu_a (issue 4, "done when").

``archnet_fx.transform`` on all-MiniLM-L6-v2 → npu_a, calibrated on the first sentences of
gensim's ``lee_background.cor``, evaluated on sentences it never saw:

* mean / min cosine of mean-pooled embeddings to the original's, on the *last* sentences of
  ``lee_background.cor`` (disjoint from the calibration ones) and on the movie-review snippets
  of ``pang_lee_polarity.cor`` (another domain);
* Spearman correlation of document-pair cosines with the human ratings of ``lee.cor``
  (``similarities0-1.txt``), next to the original's (≈ 0.50);
* wall time of the whole ``transform`` call.

For scale it also quantizes the same fp32 model with onnxruntime's own int8 tools — dynamic
(``quantize_dynamic``, int8 weights, activations quantized at run time) and static QDQ
(``quantize_static`` with a calibration reader over the same calibration sentences) — on the
original graph (no surrogates: they run LayerNorm, GELU, Softmax in float).

    python benchmarks/distill_minilm.py                        # W8A8 and W4A8, progressive
    python benchmarks/distill_minilm.py --modes progressive independent --configs 4,8
    python benchmarks/distill_minilm.py --calib 256 --eval 128 --no-ort   # quicker

Prints a table and writes ``benchmarks/results/distill_minilm.json`` (atomically).
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
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import archnet_fx as ax  # noqa: E402,F401
from archnet_fx.demo import data, zoo
from archnet_fx.infra.instruments import atomic_write_text
from archnet_fx.transform import transform  # noqa: E402


def batched(enc: dict, size: int) -> list[dict]:
    n = enc["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in enc.items()} for i in range(0, n, size)]


def last_hidden(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out["last_hidden_state"]


def embed(fn, batches) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for b in batches:
            outs.append(zoo.mean_pool(last_hidden(fn(b)), b["attention_mask"]).float())
    return torch.cat(outs)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def spearman(emb: torch.Tensor, pairs) -> float:
    from scipy.stats import spearmanr

    e = torch.nn.functional.normalize(emb, dim=-1)
    sims = [float(e[i] @ e[j]) for i, j, _ in pairs]
    return float(spearmanr(sims, [h for _, _, h in pairs]).statistic)


# --------------------------------------------------------------------------- onnxruntime


def ort_baselines(model, calib: list[dict], sets: dict[str, list[dict]], refs: dict, workdir: Path
                  ) -> list[dict]:
    import onnxruntime as ort

    from ort_minilm import NAMES as names, ort_fp32_and_int8

    paths = ort_fp32_and_int8(model, calib, workdir, static_activations="int8")
    fp32, dyn, static = paths.values()
    rows = []
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    for label, path in (("onnxruntime fp32 (export check)", fp32),
                        ("onnxruntime int8 dynamic (quantize_dynamic)", dyn),
                        ("onnxruntime int8 static QDQ (quantize_static, per-channel)", static)):
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def run(b, sess=sess):
            return torch.from_numpy(sess.run(None, {k: b[k].numpy() for k in names})[0])
        row = {"method": label, "seconds": None}
        for name, bs in sets.items():
            if name == "lee_docs":
                row["spearman"] = spearman(embed(run, bs), data.lee_similarity_pairs())
                continue
            c = cosines(embed(run, bs), refs[name])
            row[f"{name}_mean_cos"] = float(c.mean())
            row[f"{name}_min_cos"] = float(c.min())
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", type=int, default=256, help="calibration sentences (≤ 2048)")
    p.add_argument("--eval", type=int, default=256, help="held-out lee_background sentences")
    p.add_argument("--pang", type=int, default=200, help="pang_lee_polarity sentences")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--configs", nargs="*", default=["8,8", "4,8"], help="W,A bit pairs")
    p.add_argument("--modes", nargs="*", default=["progressive"],
                   choices=["progressive", "independent"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per block")
    p.add_argument("--e2e-steps", type=int, default=0)
    p.add_argument("--quantize-surrogates", default="structural",
                   choices=["all", "structural", "none"])
    p.add_argument("--host-fallback", action="store_true",
                   help="allow_host_fallback=True (while surrogate families are missing)")
    p.add_argument("--no-ort", action="store_true", help="skip the onnxruntime baselines")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "distill_minilm.json"))
    args = p.parse_args(argv)
    if args.calib > 2048:
        p.error("--calib: at most 2048 sentences")
    logging.basicConfig(level=logging.WARNING)

    sents = data.lee_background_sentences()
    if args.calib + args.eval > len(sents):
        p.error(f"--calib + --eval exceed the {len(sents)} sentences of lee_background.cor")
    calib_s, eval_s = sents[:args.calib], sents[len(sents) - args.eval:]
    pang_s = data.pang_lee_sentences(args.pang)
    calib = batched(zoo.encode_sentences(calib_s), args.batch)
    sets = {"lee_heldout": batched(zoo.encode_sentences(eval_s), 32),
            "pang_lee": batched(zoo.encode_sentences(pang_s), 32),
            "lee_docs": batched(zoo.encode_sentences(data.lee_documents()), 25)}
    pairs = data.lee_similarity_pairs()

    model, _ = zoo.get_model("minilm")
    refs = {k: embed(lambda b: model(**b), v) for k, v in sets.items() if k != "lee_docs"}
    ref_sp = spearman(embed(lambda b: model(**b), sets["lee_docs"]), pairs)
    print(f"all-MiniLM-L6-v2 → npu_a: {len(calib_s)} calibration sentences in batches of "
          f"{args.batch}, {len(eval_s)} held-out lee_background sentences, {len(pang_s)} "
          f"pang_lee sentences; original Spearman on lee.cor = {ref_sp:.4f}; "
          f"{torch.get_num_threads()} threads", flush=True)

    def save(results: list[dict]) -> None:
        """Results so far (after every configuration: a late failure loses nothing)."""
        atomic_write_text(args.out, json.dumps(dict(
            model="all-MiniLM-L6-v2", target="npu_a", calib_sentences=len(calib_s),
            batch=args.batch, epochs=args.epochs, steps=args.steps,
            heldout_sentences=len(eval_s), pang_sentences=len(pang_s),
            quantize_surrogates=args.quantize_surrogates, host_fallback=args.host_fallback,
            original_spearman=ref_sp, threads=torch.get_num_threads(), results=results),
            indent=2, default=str))

    results = []
    for cfg in args.configs:
        w, a = (int(x) for x in cfg.split(","))
        for mode in args.modes:
            t0 = time.perf_counter()
            res = transform(model, "npu_a", calib[0], calib, weight_bits=w, act_bits=a,
                            seed=0, mode=mode, epochs=args.epochs, steps=args.steps,
                            e2e_steps=args.e2e_steps, holdout=1,
                            quantize_surrogates=args.quantize_surrogates,
                            allow_host_fallback=args.host_fallback, verify=False)
            secs = time.perf_counter() - t0
            print(res.report, flush=True)
            st = res.module
            row = {"method": f"archnet_fx W{w}A{a} {mode}", "weight_bits": w, "act_bits": a,
                   "mode": mode, "seconds": secs,
                   "host_fallback": sum(res.report.after.host_fallback_counts.values()),
                   "block_losses": [(b.name, b.loss_before, b.loss_after)
                                    for b in res.report.distill.blocks],
                   "stage_seconds": res.report.seconds,
                   "boundary_store_peak_mb": res.report.distill.peak_store_mb,
                   "boundary_spilled_mb": res.report.distill.spilled_mb,
                   "process_peak_rss_mb": peak_rss_mb()}
            for name, bs in sets.items():
                if name == "lee_docs":
                    row["spearman"] = spearman(embed(lambda b: st(**b), bs), pairs)
                    continue
                c = cosines(embed(lambda b: st(**b), bs), refs[name])
                row[f"{name}_mean_cos"] = float(c.mean())
                row[f"{name}_min_cos"] = float(c.min())
            results.append(row)
            save(results)
            print(f"  W{w}A{a} {mode}: lee held-out mean cos {row['lee_heldout_mean_cos']:.4f}, "
                  f"pang_lee {row['pang_lee_mean_cos']:.4f}, Spearman {row['spearman']:.4f}, "
                  f"{secs:.0f} s", file=sys.stderr, flush=True)

    if not args.no_ort:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            results += ort_baselines(model, calib, sets, refs, Path(tmp))
            print(f"  onnxruntime baselines: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def f(v, fmt="{:.4f}"):
        return "—" if v is None else fmt.format(v)
    rows = [(r["method"], f(r.get("lee_heldout_mean_cos")), f(r.get("lee_heldout_min_cos")),
             f(r.get("pang_lee_mean_cos")), f(r.get("spearman")),
             f(r.get("seconds"), "{:.0f}"), f(r.get("process_peak_rss_mb"), "{:.0f}"))
            for r in results]
    print()
    print(tabulate(rows, headers=["method", "lee held-out mean cos", "min cos",
                                  "pang_lee mean cos", f"Spearman (orig {ref_sp:.4f})",
                                  "transform s", "peak RSS MB"], tablefmt="github"))
    save(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
