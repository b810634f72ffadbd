"""Label-free distillation of a small ViT trained here on real images → npu_a (issue 4).

What it measures: a small vision transformer (patch-embedding conv, LayerNorm, GELU, softmax
attention — all illegal on npu_a, so legalization has work to do) is trained by this script
on real images, then ``archnet_fx.transform`` legalizes it for npu_a, fake-quantizes it and
distills it block by block from the float model on *unlabeled* training images. The student's
top-1 accuracy on held-out test images is compared with the teacher's:

* W4A8 on npu_a: the goal is top-1 within 0.5 points of the teacher (``teacher - student ≤
  0.5``); the table also gives the top-1 *agreement* with the teacher's predictions;
* W2A4: npu_a allows weight bits [4, 8] and activation bits [8] only, so ``transform`` raises
  ``BitWidthError`` (the message is printed); W2A4 then runs on
  ``benchmarks/targets/npu_a_lowbit.toml`` — npu_a with weight bits [2, 4, 8] and activation
  bits [4, 8] — and its top-1 is reported.

Data: Fashion-MNIST (28×28) when Debian's ``dataset-fashion-mnist`` files are present
(``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, or
``--fashion-dir``), parsed with numpy; otherwise scikit-learn's 8×8 digits
(``archnet_fx.data.digits``) with a fixed stratified 1297/500 train/test split. The script
prints which one it used. Labels train the teacher and score the test set; ``transform`` never
sees them.

    python benchmarks/distill_vit.py                 # W4A8 + W2A4, both modes, 0 and 300 steps
    python benchmarks/distill_vit.py --transform-seeds 0 1 2 --threads 2   # the recorded run
    python benchmarks/distill_vit.py --configs 4,8 --modes progressive --steps 100 300 \
        --lr-weight 2e-3 --e2e-steps 0 100       # other settings

Defaults: 300 optimizer steps per block, ``lr_weight=1e-2`` (library default 2e-3; the other
learning rates are the library's), 1280 calibration images in batches of 64 (the last batch
held out for the fidelity figure), no end-to-end stage; ``--steps 0`` rows show the
fake-quantized student before any distillation.

Prints a table and writes ``benchmarks/results/distill_vit.json`` (atomically).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tabulate import tabulate

from archnet_fx.demo import data, zoo
from archnet_fx.errors import BitWidthError
from archnet_fx.infra.instruments import atomic_write_text
from archnet_fx.targets import load_target
from archnet_fx.transform import transform

HERE = Path(__file__).resolve().parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
LOWBIT_TARGET = HERE / "targets" / "npu_a_lowbit.toml"


# --------------------------------------------------------------------------- data


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (``.gz`` or plain): big-endian magic ``0x00 0x00 dtype ndim``, dims, data."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    arr = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, found {arr.size} bytes of data")
    return arr.reshape(dims)


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def fashion_files(root: Path) -> dict[str, Path] | None:
    stems = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    found = {k: _idx_file(root, s) for k, s in stems.items()}
    return None if any(v is None for v in found.values()) else found  # type: ignore[return-value]


def load_fashion(files: dict[str, Path], n_train: int, n_test: int):
    def images(p):
        return torch.from_numpy(_read_idx(p).astype(np.float32) / 255.0).unsqueeze(1)

    def labels(p):
        return torch.from_numpy(_read_idx(p).astype(np.int64))
    xtr, ytr = images(files["train_x"]), labels(files["train_y"])
    xte, yte = images(files["test_x"]), labels(files["test_y"])
    # file order of Fashion-MNIST is already shuffled; take the first n of each
    return xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]


def load_digits(n_test: int = 500):
    """sklearn digits, stratified split with a fixed seed (independent of ``--seed``)."""
    x, y = data.digits()
    rng = np.random.default_rng(0)
    yn = y.numpy()
    test = []
    for c in np.unique(yn):
        idx = np.flatnonzero(yn == c)
        k = int(round(n_test * len(idx) / len(yn)))
        test.extend(rng.permutation(idx)[:k].tolist())
    test_idx = np.array(sorted(test))
    train_idx = np.setdiff1d(np.arange(len(yn)), test_idx)
    train_idx = rng.permutation(train_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# --------------------------------------------------------------------------- model


class ImageViT(nn.Module):
    """``zoo.SmallViT`` sized for small grey images (same blocks, same forward)."""

    def __init__(self, img: int, patch: int, chans: int = 1, dim: int = 32, depth: int = 2,
                 heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        n = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(zoo.ViTBlock(dim, heads, 2 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    forward = zoo.SmallViT.forward


def top1(fn, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        pred = torch.cat([fn(x[i:i + bs]).argmax(-1) for i in range(0, len(x), bs)])
    return 100.0 * float((pred == y).float().mean()), pred


def train_teacher(model: nn.Module, x, y, xte, yte, epochs: int, lr: float, bs: int,
                  seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.05)
    steps = epochs * ((len(x) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            b = perm[i:i + bs]
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    acc, _ = top1(model, xte, yte)
    return {"epochs": epochs, "lr": lr, "batch": bs, "steps": steps, "final_loss": loss.item(),
            "seconds": time.perf_counter() - t0, "test_top1": acc}


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion", "digits"],
                   help="auto: Fashion-MNIST when its files exist, else digits")
    p.add_argument("--fashion-dir", default=str(FASHION_DIR))
    p.add_argument("--fashion-train", type=int, default=12000,
                   help="Fashion-MNIST training images used (first N of 60000)")
    p.add_argument("--fashion-test", type=int, default=2000,
                   help="Fashion-MNIST test images used (first N of 10000)")
    p.add_argument("--train-epochs", type=int, default=None,
                   help="teacher epochs (default 40 digits, 6 Fashion-MNIST)")
    p.add_argument("--train-lr", type=float, default=3e-3)
    p.add_argument("--calib", type=int, default=1280,
                   help="unlabeled training images for transform (last batch held out)")
    p.add_argument("--batch", type=int, default=64, help="calibration batch size")
    p.add_argument("--configs", nargs="*", default=["4,8", "2,4"], help="W,A bit pairs")
    p.add_argument("--modes", nargs="*", default=["progressive", "independent"],
                   choices=["progressive", "independent"])
    p.add_argument("--steps", type=int, nargs="*", default=[0, 300],
                   help="optimizer steps per block (several: one row each)")
    p.add_argument("--e2e-steps", type=int, nargs="*", default=[0],
                   help="end-to-end steps after the blocks (several: one row each)")
    p.add_argument("--lr-weight", type=float, default=1e-2,
                   help="DistillOptions.lr_weight (library default 2e-3)")
    p.add_argument("--lr-quant", type=float, default=None)
    p.add_argument("--lr-surrogate", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="teacher training seed")
    p.add_argument("--transform-seeds", type=int, nargs="*", default=None,
                   help="transform seeds (several: one row each; default: --seed)")
    p.add_argument("--lowbit-target", default=str(LOWBIT_TARGET),
                   help="target file for widths npu_a does not allow")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default=str(HERE / "results" / "distill_vit.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    tseeds = args.transform_seeds or [args.seed]
    configs = []
    for cfg in args.configs:
        try:
            w, a = (int(v) for v in cfg.split(","))
        except ValueError:
            p.error(f"--configs: expected W,A such as 4,8, got {cfg!r}")
        configs.append((w, a))

    # ---- data
    files = fashion_files(Path(args.fashion_dir)) if args.dataset != "digits" else None
    if args.dataset == "fashion" and files is None:
        p.error(f"--dataset fashion: Fashion-MNIST idx files not found in {args.fashion_dir}")
    if files is not None:
        dataset = "fashion-mnist"
        xtr, ytr, xte, yte = load_fashion(files, args.fashion_train, args.fashion_test)
        model_kw = dict(img=28, patch=4, dim=48, depth=2, heads=4)
        epochs = args.train_epochs or 6
        train_bs = 128
        source = f"Fashion-MNIST from {args.fashion_dir}"
    else:
        dataset = "digits"
        xtr, ytr, xte, yte = load_digits()
        model_kw = dict(img=8, patch=2, dim=32, depth=2, heads=4)
        epochs = args.train_epochs or 40
        train_bs = 64
        why = ("--dataset digits" if args.dataset == "digits" else
               f"no Fashion-MNIST idx files in {args.fashion_dir}")
        source = f"scikit-learn 8x8 digits ({why})"
    print(f"dataset: {source}: {len(xtr)} train / {len(xte)} test images of "
          f"{tuple(xtr.shape[1:])}; {torch.get_num_threads()} threads", flush=True)

    # ---- teacher
    torch.manual_seed(args.seed)
    teacher = ImageViT(**model_kw)
    n_params = sum(t.numel() for t in teacher.parameters())
    tinfo = train_teacher(teacher, xtr, ytr, xte, yte, epochs, args.train_lr, train_bs,
                          args.seed)
    t_acc, t_pred = top1(teacher, xte, yte)
    print(f"teacher: ImageViT{model_kw} ({n_params} parameters), {epochs} epochs AdamW in "
          f"{tinfo['seconds']:.1f} s → test top-1 {t_acc:.2f}%", flush=True)

    # ---- calibration batches (unlabeled training images)
    n_cal = min(args.calib, len(xtr))
    calib = [(xtr[i:i + args.batch],) for i in range(0, n_cal, args.batch)]
    example = (xtr[:32],)

    dopts = {k: v for k, v in (("lr_weight", args.lr_weight), ("lr_quant", args.lr_quant),
                               ("lr_surrogate", args.lr_surrogate)) if v is not None}
    results, refusals = [], []
    for w, a in configs:
        target: object = "npu_a"
        try:
            load_target("npu_a").quant.check_bits(w, a)
        except BitWidthError:
            try:  # the real call, to show what the user sees
                transform(teacher, "npu_a", example_inputs=example, calib_data=calib,
                          weight_bits=w, act_bits=a, seed=args.seed, progress=False)
            except BitWidthError as e:
                msg = f"{type(e).__name__}: {e}"
                print(f"W{w}A{a} on npu_a → {msg}", flush=True)
                refusals.append({"weight_bits": w, "act_bits": a, "target": "npu_a",
                                 "error": msg})
            else:
                raise AssertionError(f"transform accepted W{w}A{a} on npu_a")
            target = load_target(args.lowbit_target)
            print(f"W{w}A{a}: running on {target.name} ({args.lowbit_target})", flush=True)
        tname = target if isinstance(target, str) else target.name
        for mode in args.modes:
            for steps, e2e, tseed in itertools.product(args.steps, args.e2e_steps, tseeds):
                t0 = time.perf_counter()
                res = transform(teacher, target, example_inputs=example, calib_data=calib,
                                weight_bits=w, act_bits=a, seed=tseed, mode=mode,
                                steps=steps, e2e_steps=e2e, holdout=1, progress=False,
                                **dopts)
                secs = time.perf_counter() - t0
                s_acc, s_pred = top1(res.module, xte, yte)
                rep = res.report
                fid = rep.fidelity_of("distilled")
                row = {
                    "config": f"W{w}A{a}", "weight_bits": w, "act_bits": a,
                    "target": tname, "mode": mode, "steps": steps, "e2e_steps": e2e,
                    "seed": tseed,
                    "teacher_top1": t_acc, "student_top1": s_acc,
                    "delta": s_acc - t_acc,
                    "agreement": 100.0 * float((s_pred == t_pred).float().mean()),
                    "within_0.5": (t_acc - s_acc) <= 0.5 + 1e-9,
                    "seconds": secs,
                    "unsupported_before": len(rep.before.unsupported),
                    "unsupported_after": len(rep.after.unsupported),
                    "host_fallback_after": sum(rep.after.host_fallback_counts.values()),
                    "holdout_cosine": fid[0]["cosine"] if fid else None,
                    "holdout_nmse": fid[0]["nmse"] if fid else None,
                    "block_losses": [(b.name, b.loss_before, b.loss_after)
                                     for b in rep.distill.blocks],
                    "stage_seconds": rep.seconds,
                }
                results.append(row)
                print(f"  W{w}A{a} {tname} {mode} steps={steps} e2e={e2e} seed={tseed}: "
                      f"student {s_acc:.2f}% vs teacher {t_acc:.2f}% (Δ {row['delta']:+.2f}, "
                      f"agreement {row['agreement']:.1f}%), {secs:.1f} s", flush=True)

    rows = [(r["config"], r["target"], r["mode"], r["steps"], r["e2e_steps"], r["seed"],
             f"{r['teacher_top1']:.2f}", f"{r['student_top1']:.2f}", f"{r['delta']:+.2f}",
             f"{r['agreement']:.1f}", f"{r['seconds']:.1f}",
             f"{r['unsupported_before']} → {r['unsupported_after']}") for r in results]
    print()
    print(tabulate(rows, headers=["config", "target", "mode", "steps/block", "e2e steps", "seed",
                                  "teacher top-1", "student top-1", "Δ (points)",
                                  "agree w/ teacher %", "transform s",
                                  "unsupported before → after"],
                   tablefmt="github", disable_numparse=True))
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["config"], r["target"], r["mode"], r["steps"], r["e2e_steps"]),
                          []).append(r)
    summary = []
    for (cfg, tname, mode, steps, e2e), rs in groups.items():
        deltas = [r["delta"] for r in rs]
        summary.append({"config": cfg, "target": tname, "mode": mode, "steps": steps,
                        "e2e_steps": e2e, "seeds": [r["seed"] for r in rs],
                        "mean_student_top1": float(np.mean([r["student_top1"] for r in rs])),
                        "mean_delta": round(float(np.mean(deltas)), 6) + 0.0,  # no "-0.00"
                        "worst_delta": min(deltas),
                        "within_0.5": sum(r["within_0.5"] for r in rs)})
    print()
    print(tabulate([(g["config"], g["target"], g["mode"], g["steps"], g["e2e_steps"],
                     len(g["seeds"]), f"{g['mean_student_top1']:.2f}", f"{g['mean_delta']:+.2f}",
                     f"{g['worst_delta']:+.2f}", f"{g['within_0.5']}/{len(g['seeds'])}")
                    for g in summary],
                   headers=["config", "target", "mode", "steps/block", "e2e steps", "seeds",
                            "mean student top-1", "mean Δ", "worst Δ",
                            "within 0.5 of teacher"], tablefmt="github", disable_numparse=True))
    for r in refusals:
        print(f"W{r['weight_bits']}A{r['act_bits']} on npu_a: {r['error']}")
    atomic_write_text(args.out, json.dumps(dict(
        dataset=dataset, data_source=source, train_images=len(xtr), test_images=len(xte),
        model=dict(model_kw, parameters=n_params), teacher_training=tinfo,
        teacher_top1=t_acc, calib_images=n_cal, calib_batch=args.batch, holdout_batches=1,
        teacher_seed=args.seed, threads=torch.get_num_threads(), distill_options=dopts,
        refusals=refusals, summary=summary, results=results), indent=2, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
