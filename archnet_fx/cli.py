"""The ``archnet-fx`` command line.

::

    archnet-fx targets                         # the built-in targets as a table
    archnet-fx models                          # the built-in demo models
    archnet-fx inspect MODEL --target npu_a    # legality before, per-pass diffs, legality after
    archnet-fx candidates --target npu_b       # surrogate candidates per kind, and the default
    archnet-fx demo                            # all-MiniLM-L6-v2 on every built-in target
    archnet-fx bench MODEL --target npu_a      # latency estimate (--legalize: before/after)
    archnet-fx transform MODEL --target npu_a --out model.onnx   # distilled W/A-bit QDQ ONNX
    archnet-fx transform MODEL -t npu_a -o m.onnx --choice gelu=hard_gate --choice softmax=softmax_pow

MODEL is a built-in name (``archnet-fx models``) or ``package.module:factory``, where
``factory()`` returns ``(model, example_inputs)`` or a model (then give ``--input-shape``).
Errors a user can cause print one ``error:`` line with the fix and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from archnet_fx.errors import ArchnetError

log = logging.getLogger("archnet_fx.cli")


class UsageError(ArchnetError, ValueError):
    """Bad command-line arguments (model spec, shapes)."""


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: write dimensions as 1,3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: dimensions must be positive integers")
    return dims


def resolve_model(spec: str, input_shapes: Sequence[str] = (), batch: int = 2
                  ) -> tuple[torch.nn.Module, Any, str]:
    """(model, example_inputs, display name) for a built-in name or ``pkg.module:factory``."""
    from archnet_fx.demo import zoo

    if ":" not in spec:
        if spec not in zoo.MODELS:
            raise UsageError(f"unknown model {spec!r}: use one of {', '.join(zoo.list_models())} "
                             "or package.module:factory")
        model, ex = zoo.get_model(spec, batch_size=batch)
        return model, ex, spec
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} from MODEL {spec!r}: {e}") from e
    factory = getattr(mod, fn_name, None)
    if not callable(factory):
        raise UsageError(f"{mod_name} has no callable {fn_name!r} (MODEL is "
                         "package.module:factory)")
    made = factory()
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        return made[0], made[1], spec
    if isinstance(made, torch.nn.Module):
        if not input_shapes:
            raise UsageError(f"{spec} returned a model without example inputs: return "
                             "(model, example_inputs) from the factory or pass --input-shape "
                             "B,C,H,W (once per input)")
        g = torch.Generator().manual_seed(0)
        ex = tuple(torch.randn(_parse_shape(s), generator=g) for s in input_shapes)
        return made, ex, spec
    raise UsageError(f"{spec} returned {type(made).__name__}; expected a torch.nn.Module or "
                     "(model, example_inputs)")


def cmd_targets(args: argparse.Namespace) -> int:
    from archnet_fx.targets import list_targets, load_target, targets_table

    print(targets_table([load_target(n) for n in list_targets()]))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from archnet_fx.demo import zoo

    print(tabulate([(s.name, s.description) for s in zoo.MODELS.values()],
                   headers=["model", "description"], tablefmt="github"))
    return 0


def cmd_candidates(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from archnet_fx.legalize import default_candidates
    from archnet_fx.targets import load_target

    rows = []
    for t in args.target or ["npu_a", "npu_b", "dsp_c"]:
        tgt = load_target(t)
        for kind, cands in default_candidates(tgt, prefer=_prefer(args)).items():
            offered = [c for c, why in cands if why is None]
            if tgt.supports(kind):
                over = ", ".join(c.name for c in offered)
                rows.append((tgt.name, kind, "native", "-",
                             f"over a limit: {over}" if over else ""))
                continue
            default = offered[0].name if offered else "none (host fallback)"
            others = ", ".join(f"{c.name} ({c.style})" if why is None
                               else f"{c.name}: {why}" for c, why in cands[1:]
                               if c is not (offered[0] if offered else None))
            rows.append((tgt.name, kind, default,
                         offered[0].style if offered else "-", others))
    print(tabulate(rows, headers=["target", "kind", "default", "style", "other candidates"],
                   tablefmt="github"))
    print("\nnorm_chain_* candidates fire only on hand-written normalization chains; other "
          "nodes of those kinds go to the next candidate.")
    return 0


def _inspect(model: torch.nn.Module, ex: Any, name: str, target: str, *, dot: str | None,
             detail: Sequence[str], verify: bool) -> None:
    import archnet_fx as ax
    from archnet_fx.infra.instruments import write_dot

    t0 = time.perf_counter()
    gm = ax.capture(model, ex)
    info = gm.meta["archnet.capture"]
    print(f"# {name}: captured with {info.method} in {time.perf_counter() - t0:.2f} s "
          f"({sum(1 for _ in gm.graph.nodes)} nodes)")
    print(f"\n## legality before, on {target}\n")
    print(ax.check(gm, target), flush=True)
    print(f"\n(legality listed after {time.perf_counter() - t0:.2f} s; legalizing...)",
          flush=True)
    res = ax.legalize(gm, target, verify=verify, allow_host_fallback=True)
    print("\n## pass diffs (canonicalization, then legalization)\n")
    print(res.diff())
    for p in detail:
        try:
            text = res.diff(p)
        except KeyError:
            raise UsageError(f"--pass {p!r}: no pass of that name ran; passes: "
                             f"{', '.join(r.name for r in res.records)}") from None
        print(f"\n### {p}\n")
        print(text)
    print(f"\n## legality after, on {target}\n")
    print(res.after)
    if res.choices:
        print("\ncandidates used: " + ", ".join(f"{n}→{c}" for n, c in res.choices.items()))
    if dot:
        out = Path(dot)
        a = write_dot(gm, out / f"{name.replace(':', '_')}.before.dot")
        b = write_dot(res.module, out / f"{name.replace(':', '_')}.after.dot")
        print(f"\nwrote {a} and {b} (render with: dot -Tsvg FILE -o FILE.svg)")
    print(f"\n(total {time.perf_counter() - t0:.2f} s)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from archnet_fx.targets import load_target

    load_target(args.target)  # fail early on a bad target
    model, ex, name = resolve_model(args.model, args.input_shape, args.batch)
    _inspect(model, ex, name, args.target, dot=args.dot, detail=args.pass_detail,
             verify=not args.no_verify)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import archnet_fx as ax
    from archnet_fx.demo import zoo

    t0 = time.perf_counter()
    model, ex = zoo.get_model("minilm", batch_size=2)
    print(f"# all-MiniLM-L6-v2 (real weights), 2 real sentences × 128 tokens, loaded in "
          f"{time.perf_counter() - t0:.1f} s")
    gm = ax.capture(model, ex)
    print(f"captured with {gm.meta['archnet.capture'].method}: "
          f"{sum(1 for _ in gm.graph.nodes)} nodes")
    for tgt in ax.list_targets():
        print(f"\n## legality on {tgt}\n")
        print(ax.check(gm, tgt).table(max_nodes=12))
    from tabulate import tabulate
    rows = []
    for tgt in ax.list_targets():
        t1 = time.perf_counter()
        res = ax.legalize(gm, tgt, allow_host_fallback=True)
        rep = res.after
        rows.append((tgt, len(res.before.unsupported), sum(rep.on_chip_counts.values()),
                     len(rep.unsupported), sum(rep.host_fallback_counts.values()),
                     sum(rep.prologue_counts.values()), f"{time.perf_counter() - t1:.1f}"))
        if tgt == "npu_a":
            print("\n## canonicalization and legalization for npu_a\n")
            print(res.diff())
    print("\n## after legalization\n")
    print(tabulate(rows, headers=["target", "unsupported before", "legal on-chip after",
                                  "unsupported after", "host fallback", "host prologue", "s"],
                   tablefmt="github"))
    if args.legalize_only:
        print(f"\n(demo took {time.perf_counter() - t0:.1f} s)")
        return 0
    _demo_transform(model, gm, args)
    print(f"\n(demo took {time.perf_counter() - t0:.1f} s)")
    return 0


def _demo_transform(model: torch.nn.Module, gm: torch.fx.GraphModule,
                    args: argparse.Namespace) -> None:
    """The rest of the main job on npu_a: a short W8A8 distillation on real unlabeled
    sentences, the latency estimate before/after, and the checked ONNX QDQ export."""
    from tabulate import tabulate

    from archnet_fx.demo import data, zoo
    from archnet_fx.export.onnx import export_onnx
    from archnet_fx.cost.latency import estimate_latency
    from archnet_fx.legalize import legalize
    from archnet_fx.transform import transform

    n, bs = args.sentences, 16
    sents = data.lee_background_sentences()[:n]
    enc = zoo.encode_sentences(sents)
    batches = [{k: v[i:i + bs] for k, v in enc.items()} for i in range(0, n, bs)]
    print(f"\n## transform → npu_a, W8A8: {n} unlabeled sentences of lee_background.cor, "
          f"{args.steps} steps per block (benchmarks/distill_minilm.py runs the full version)\n")
    t1 = time.perf_counter()
    res = transform(model, "npu_a", batches[0], batches, weight_bits=8, act_bits=8,
                    steps=args.steps, holdout=1, progress=False, verify=False,
                    max_seq_len="auto")
    print(res.report)
    print(f"(transform took {time.perf_counter() - t1:.1f} s)")
    one = {k: v[:1] for k, v in batches[0].items()}
    fast = legalize(gm, "npu_a", one, verify=False, select="latency")
    lat = [estimate_latency(m, "npu_a", one) for m in (gm, res.module, fast.module)]
    a, b, c = (r.summary() for r in lat)
    print("\n## estimated latency on npu_a, batch 1 × 128 tokens (archnet-fx bench for more)\n")
    kept = ", ".join(f"{r['node']}→{r['candidate']}" for r in fast.selection if r["kept"])
    print(tabulate([(label, f"{d['total_us']:.0f}", f"{a['total_us'] / d['total_us']:.2f}x",
                     d["fallback_regions"], f"{100 * d['fallback_share']:.1f}",
                     f"{d['roofline_us']:.0f}")
                    for label, d in (("original", a), ("transformed", b),
                                     (f"legalized with select='latency' ({kept or 'no change'})",
                                      c))],
                   headers=["model", "estimate us", "speed-up", "host fallback regions",
                            "fallback %", "roofline us"], tablefmt="github"))
    out = Path(args.out_dir) / "minilm_npu_a_w8a8.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n## ONNX export (checked integer by integer in onnxruntime; any batch, any "
          f"sequence length up to the calibration data's)\n\n{export_onnx(res, out)}")


def cmd_bench(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from archnet_fx.capture import capture
    from archnet_fx.cost.latency import estimate_latency
    from archnet_fx.targets import load_target

    tgt = load_target(args.target)
    tgt.quant.check_bits(args.weight_bits, args.act_bits)  # fail early on bad bits
    model, ex, name = resolve_model(args.model, args.input_shape, args.batch)
    gm = capture(model, ex)
    bits = dict(weight_bits=args.weight_bits, act_bits=args.act_bits)
    before = estimate_latency(gm, tgt, **bits)
    print(f"# {name} on {tgt.name}: original\n")
    print(before.table(nodes=args.nodes))
    if not args.legalize:
        return 0
    from archnet_fx.legalize import legalize

    res = legalize(gm, tgt, allow_host_fallback=True, verify=False, select=args.select,
                   prefer=_prefer(args), choices=args.choice or None)
    after = estimate_latency(res.module, tgt, **bits)
    print(f"\n# {name} on {tgt.name}: legalized\n")
    if res.choices:
        used = Counter(res.choices.values())
        print("candidates: " + ", ".join(f"{c} ×{k}" for c, k in sorted(used.items())) + "\n")
    print(after.table(nodes=args.nodes))
    a, b = before.summary(), after.summary()
    keys = [("total_us", "total us"), ("chip_us", "chip us"), ("fallback_us", "fallback us"),
            ("fallback_regions", "fallback regions"), ("prologue_us", "prologue us"),
            ("io_us", "link I/O us"), ("kernels", "chip kernels"),
            ("roofline_us", "roofline us"), ("ratio_to_roofline", "ratio to roofline")]
    rows = [(label, a[k], b[k]) for k, label in keys]
    print("\n# side by side\n")
    print(tabulate(rows, headers=["", "original", "legalized"], tablefmt="github",
                   floatfmt=".2f"))
    print(f"\nspeed-up: {before.total_s / after.total_s:.2f}x")
    return 0


def cmd_transform(args: argparse.Namespace) -> int:
    """Legalize, fake-quantize, distill, convert to Q/DQ and export ONNX."""
    from archnet_fx.export.onnx import check_output_path, export_onnx
    from archnet_fx.targets import load_target
    from archnet_fx.transform import transform

    check_output_path(args.out)            # before any work: a directory, under a file, ...
    if args.golden:
        check_output_path(args.golden)
    tgt = load_target(args.target)
    tgt.quant.check_bits(args.weight_bits, args.act_bits)  # fail early on bad bits
    model, ex, name = resolve_model(args.model, args.input_shape, args.batch)
    # Calibration: the example batch (built-in models build it from real or seeded data).
    res = transform(model, tgt, ex, [ex], weight_bits=args.weight_bits, act_bits=args.act_bits,
                    steps=args.steps, holdout=0, progress=False, prefer=_prefer(args),
                    choices=args.choice or None, select=args.select,
                    max_seq_len=args.max_seq_len)
    print(res.report)
    rep = export_onnx(res, args.out, target=tgt, dynamic_batch=not args.fixed_batch,
                      golden=args.golden)
    print(f"\nwrote {rep}")
    if args.verbose and rep.exactness is not None:
        print("\n" + rep.exactness.table())
    if args.verbose and rep.layer_sqnr:
        print("\n" + rep.sqnr_table())
    return 0


def _seq_len(text: str) -> int | str | None:
    """``--max-seq-len``: an integer >= 2, ``auto`` or ``none``."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, 'auto' or 'none', got "
                                          f"{text!r}")
    return n


def _prefer(args: argparse.Namespace) -> str:
    """``--prefer``, or the library's default style (one place: surrogate.base.DEFAULT_STYLE)."""
    from archnet_fx.surrogate.base import DEFAULT_STYLE

    return args.prefer or DEFAULT_STYLE


def _choice(text: str) -> tuple[str, str]:
    """``KIND_OR_NODE=CANDIDATE`` (e.g. ``gelu=hard_gate``) for ``--choice``."""
    key, sep, cand = text.partition("=")
    if not sep or not key.strip() or not cand.strip():
        raise argparse.ArgumentTypeError(
            f"expected KIND_OR_NODE=CANDIDATE (e.g. gelu=hard_gate), got {text!r}; "
            "'archnet-fx candidates' lists the candidates")
    return key.strip(), cand.strip()


class _Choices(argparse.Action):
    """Collects repeated ``--choice`` pairs into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        d = dict(getattr(namespace, self.dest) or {})
        key, cand = values
        d[key] = cand
        setattr(namespace, self.dest, d)


def _surrogate_options(sp: argparse.ArgumentParser, select_help: str) -> None:
    sp.add_argument("--prefer", default=None, choices=["emulation", "structural"],
                    help="preferred surrogate style (default emulation)")
    sp.add_argument("--choice", action=_Choices, type=_choice, default=None,
                    metavar="KIND_OR_NODE=CANDIDATE",
                    help="pick a candidate for an op kind or one node (repeatable), e.g. "
                    "--choice gelu=hard_gate --choice softmax=softmax_pow")
    sp.add_argument("--select", choices=["order", "latency"], default="order", help=select_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archnet-fx", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("targets", help="list built-in targets").set_defaults(fn=cmd_targets)
    sub.add_parser("models", help="list built-in demo models").set_defaults(fn=cmd_models)
    sp = sub.add_parser("inspect", help="legality and pass diffs of a model on a target")
    sp.add_argument("model", help="built-in model name or package.module:factory")
    sp.add_argument("--target", "-t", required=True, help="target name or path to a .toml")
    sp.add_argument("--input-shape", action="append", default=[],
                    help="shape of a random float input, e.g. 1,3,32,32 (repeat per input)")
    sp.add_argument("--batch", type=int, default=2, help="batch size of built-in examples")
    sp.add_argument("--dot", metavar="DIR", help="write before/after DOT graph files here")
    sp.add_argument("--pass", dest="pass_detail", action="append", default=[],
                    metavar="NAME", help="also print this pass's detailed diff")
    sp.add_argument("--no-verify", action="store_true",
                    help="skip numerical verification after each pass")
    sp.set_defaults(fn=cmd_inspect)
    sp = sub.add_parser("candidates", help="surrogate candidates per op kind and target")
    sp.add_argument("--target", "-t", action="append", help="target (repeatable; default all)")
    sp.add_argument("--prefer", default=None, help="preferred style (default emulation)")
    sp.set_defaults(fn=cmd_candidates)
    sp = sub.add_parser("demo", help="all-MiniLM-L6-v2: legality and legalization on every "
                        "target, then transform, latency and ONNX export for npu_a")
    sp.add_argument("--out-dir", default="archnet_demo", help="where the ONNX file goes")
    sp.add_argument("--sentences", type=int, default=48, help="calibration sentences")
    sp.add_argument("--steps", type=int, default=4, help="distillation steps per block")
    sp.add_argument("--legalize-only", action="store_true", help="stop after legalization")
    sp.set_defaults(fn=cmd_demo)
    sp = sub.add_parser("bench", help="estimated latency of a model on a target")
    sp.add_argument("model", help="built-in model name or package.module:factory")
    sp.add_argument("--target", "-t", required=True, help="target name or path to a .toml")
    sp.add_argument("--batch", type=int, default=1, help="batch size of built-in examples")
    sp.add_argument("--input-shape", action="append", default=[],
                    help="shape of a random float input, e.g. 1,3,32,32 (repeat per input)")
    sp.add_argument("--legalize", "--transformed", dest="legalize", action="store_true",
                    help="also legalize (host fallback allowed) and compare before/after")
    sp.add_argument("--weight-bits", type=int, help="weight bits (default: the target's)")
    sp.add_argument("--act-bits", type=int, help="activation bits (default: the target's)")
    sp.add_argument("--nodes", action="store_true", help="also print every node's row")
    _surrogate_options(sp, "with --legalize: lossless candidates by default order or by the "
                       "latency estimate (e.g. embeddings looked up on the host)")
    sp.set_defaults(fn=cmd_bench)
    sp = sub.add_parser("transform", help="transform a model for a target and export ONNX")
    sp.add_argument("model", help="built-in model name or package.module:factory")
    sp.add_argument("--target", "-t", required=True, help="target name or path to a .toml")
    sp.add_argument("--out", "-o", required=True, help="ONNX file to write (atomically)")
    sp.add_argument("--weight-bits", type=int, help="weight bits (default: the target's)")
    sp.add_argument("--act-bits", type=int, help="activation bits (default: the target's)")
    sp.add_argument("--steps", type=int, default=50, help="distillation steps per block")
    sp.add_argument("--batch", type=int, default=8, help="batch size of built-in examples")
    sp.add_argument("--fixed-batch", action="store_true",
                    help="export the example's batch size (for graphs that pin it)")
    sp.add_argument("--max-seq-len", type=_seq_len, default="auto", metavar="N|auto|none",
                    help="sequence lengths the result takes, 2 to N (default auto: the "
                         "example's length for models with token-id inputs; none: fixed)")
    sp.add_argument("--golden", metavar="NPZ",
                    help="also write every Q/DQ tensor of the example run to this .npz")
    sp.add_argument("--input-shape", action="append", default=[],
                    help="shape of a random float input, e.g. 1,3,32,32 (repeat per input)")
    _surrogate_options(sp, "lossless candidates by default order or by the latency estimate")
    sp.set_defaults(fn=cmd_transform)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:   # the exporter's full message when it fails
        logging.getLogger("archnet_fx.export").setLevel(logging.DEBUG)
    try:
        return int(args.fn(args) or 0)
    except (ArchnetError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
