"""The archnet-fx command line.

::

    archnet-fx targets                         # the built-in targets as a table
    archnet-fx models                          # the built-in demo models
    archnet-fx inspect MODEL --target npu_a    # legality before, per-pass diffs, legality after
    archnet-fx candidates --target npu_b       # surrogate candidates per kind, and the default
    archnet-fx demo                            # all-MiniLM-L6-v2 on every built-in target
    archnet-fx bench MODEL --target npu_a      # latency estimate (--legalize: before/after)
    archnet-fx transform MODEL --target npu_a --calib data.txt --out-dir out/
    archnet-fx transform MODEL -t npu_a -o m.onnx --choice gelu=hard_gate --choice softmax=softmax_pow

MODEL is a built-in name (archnet-fx models), package.module:factory (the current directory
is importable; factory() returns (model, example_inputs) or a model, then give
--input-shape), or a local Hugging Face model directory (config.json beside the weights).
--calib takes a text file (one sample per line), a folder of images, or .npy/.npz/.pt tensors.
Errors a user can cause print one "error:" line with the fix and exit with status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from archnet_fx.errors import ArchnetError
from archnet_fx.workflow.models import LoadedModel, UsageError, parse_shape
from archnet_fx.workflow.models import resolve_model as _resolve

if TYPE_CHECKING:
    import torch

log = logging.getLogger("archnet_fx.cli")
progress = logging.getLogger("archnet_fx.progress")

__all__ = ["UsageError", "build_parser", "main", "resolve_model"]


def _parse_shape(text: str) -> tuple[int, ...]:
    return parse_shape(text)


def resolve_model(spec: str, input_shapes: Sequence[str] = (), batch: int = 2,
                  seq_len: int = 128) -> tuple[Any, Any, str]:
    """(model, example_inputs, display name) for any MODEL form (see the module docstring);
    a Hugging Face directory gets a placeholder example of ``seq_len`` tokens or one image."""
    from archnet_fx.workflow.models import shape_example

    lm = _resolve(spec, input_shapes, batch)
    ex = lm.example if lm.example is not None else shape_example(lm, seq_len, batch)
    return lm.model, ex, lm.name


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

    from archnet_fx.workflow.models import quiet_transformers

    t0 = time.perf_counter()
    with quiet_transformers():
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
    from archnet_fx.infra.progress import stage

    for tgt in ax.list_targets():
        t1 = time.perf_counter()
        with stage(f"legalize for {tgt}") as st:
            res = ax.legalize(gm, tgt, allow_host_fallback=True)
            st.detail = f"{len(res.before.unsupported)} unsupported before, " \
                        f"{len(res.after.unsupported)} after"
        rep = res.after
        rows.append((tgt, len(res.before.unsupported), sum(rep.on_chip_counts.values()),
                     len(rep.unsupported), sum(rep.host_fallback_counts.values()),
                     sum(rep.prologue_counts.values()), f"{time.perf_counter() - t1:.1f}"))
        if tgt == "npu_a":
            print("\n## canonicalization and legalization for npu_a\n")
            print(res.diff())
    print("\n## after legalization\n")
    print("(\"unsupported before\" counts the canonicalized graph: canonicalization already "
          "removed dropout and folded the constant creation, compare and cast nodes the legality "
          "tables above count)\n")
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
    from archnet_fx.transform import transform

    n, bs = args.sentences, 16
    sents = data.lee_background_sentences()[:n]
    enc = zoo.encode_sentences(sents)
    batches = [{k: v[i:i + bs] for k, v in enc.items()} for i in range(0, n, bs)]
    print(f"\n## transform → npu_a, W8A8: {n} unlabeled sentences of lee_background.cor, "
          "every candidate surrogate measured and the fastest combination that keeps the "
          f"held-out cosine ≥ 0.99 selected, then {args.steps} distillation steps per block "
          "(benchmarks/distill_minilm.py runs the full version)\n")
    t1 = time.perf_counter()
    res = transform(model, "npu_a", batches[0], batches, weight_bits=8, act_bits=8,
                    steps=args.steps, holdout=1, progress=not args.quiet and sys.stderr.isatty(),
                    verify=False, max_seq_len="auto")
    print(res.report)
    print(f"(transform took {time.perf_counter() - t1:.1f} s)")
    one = {k: v[:1] for k, v in batches[0].items()}
    lat = [estimate_latency(m, "npu_a", one) for m in (gm, res.module)]
    a, b = (r.summary() for r in lat)
    print("\n## estimated latency on npu_a, batch 1 × 128 tokens (archnet-fx bench for more)\n")
    print(tabulate([(label, f"{d['total_us']:.0f}", f"{a['total_us'] / d['total_us']:.2f}x",
                     d["fallback_regions"], f"{100 * d['fallback_share']:.1f}",
                     f"{d['roofline_us']:.0f}")
                    for label, d in (("original", a), ("transformed (the selected candidates)",
                                                       b))],
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
    print("\nroofline: the time if every op ran at the chip's peak rate or bandwidth, whichever "
          "binds; ratio to roofline: estimate / roofline (overheads, host fallback, link I/O)")
    print(f"\nspeed-up: {before.total_s / after.total_s:.2f}x (estimated, W{before.weight_bits}"
          f"A{before.act_bits})")
    return 0


def _calibration(args: argparse.Namespace, lm: LoadedModel) -> tuple[list[Any], str]:
    """Calibration batches for ``transform`` and a sentence saying what they are."""
    from archnet_fx.workflow.calib import load_calibration

    if args.calib:
        data = load_calibration(args.calib, lm, seq_len=args.seq_len, batch_size=args.batch_size,
                                limit=args.limit, image_size=args.image_size, mean=args.mean,
                                std=args.std)
        return data.batches, data.describe()
    if args.random_calib:
        from archnet_fx.workflow.models import shape_example

        ex = shape_example(lm, args.seq_len, args.batch_size)
        batches = _random_batches(ex, args.limit or 4 * args.batch_size, args.batch_size)
        log.warning("--random-calib: calibrating on random samples; the result fits noise, not "
                    "your data — pass --calib with a few hundred real samples")
        return batches, (f"{sum(_rows(b) for b in batches)} random samples (--random-calib), "
                         f"{len(batches)} batches")
    if lm.example is not None and not lm.example_is_random:
        log.warning("no --calib: calibrating on %s's example inputs only; pass --calib with a "
                    "few hundred real samples for a faithful result", lm.name)
        return [lm.example], f"the example inputs of {lm.name} ({_rows(lm.example)} samples)"
    if lm.example_is_random:
        raise UsageError("--input-shape gives random inputs: pass --calib FILE with real "
                         "unlabeled data, or add --random-calib to calibrate on random samples")
    raise UsageError(f"MODEL {lm.name!r} comes without data: pass --calib FILE (a text file, a "
                     "folder of images or .npy/.npz/.pt tensors), or --random-calib")


def _rows(batch: Any) -> int:
    import torch

    leaves = list(batch.values()) if isinstance(batch, dict) else (
        [batch] if isinstance(batch, torch.Tensor) else list(batch))
    t = next((x for x in leaves if isinstance(x, torch.Tensor) and x.dim()), None)
    return int(t.shape[0]) if t is not None else 1


def _random_batches(ex: Any, n: int, bs: int) -> list[Any]:
    """``n`` samples shaped like ``ex``: floats N(0, 1); integer inputs (token ids, masks)
    repeat the example's rows."""
    import torch

    g = torch.Generator().manual_seed(0)

    def like(t: Any, rows: int) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.is_floating_point():
            return torch.randn((rows, *t.shape[1:]), generator=g, dtype=t.dtype)
        idx = torch.arange(rows) % t.shape[0]
        return t[idx]
    out = []
    for i in range(0, n, bs):
        r = min(bs, n - i)
        if isinstance(ex, dict):
            out.append({k: like(v, r) for k, v in ex.items()})
        elif isinstance(ex, torch.Tensor):
            out.append((like(ex, r),))
        else:
            out.append(tuple(like(v, r) for v in ex))
    return out


def cmd_transform(args: argparse.Namespace) -> int:
    """Legalize, fake-quantize, distill, convert to Q/DQ and export ONNX (and, with --out-dir,
    the reports and figures)."""
    from archnet_fx.export.onnx import check_output_path
    from archnet_fx.infra.progress import stage
    from archnet_fx.targets import load_target
    from archnet_fx.workflow.calib import check_paths

    if not args.out and not args.out_dir:
        raise UsageError("say where the result goes: --out-dir DIR (model.onnx, report.md, "
                         "report.json, figures) or --out FILE.onnx")
    onnx_path = Path(args.out) if args.out else Path(args.out_dir) / "model.onnx"
    check_output_path(onnx_path)           # before any work: a directory, under a file, ...
    if args.out_dir:
        for name in ("report.md", "report.json"):
            check_output_path(Path(args.out_dir) / name)
    if args.golden:
        check_output_path(args.golden)
    tgt = load_target(args.target)
    tgt.quant.check_bits(args.weight_bits, args.act_bits)  # fail early on bad bits
    if args.calib and args.random_calib:
        raise UsageError("--calib and --random-calib: give one (real data, or random samples)")
    measured = [f for f, on in (("--speedup", args.speedup is not None),
                                ("--latency-budget", args.latency_budget is not None),
                                ("--min-fidelity", args.min_fidelity is not None),
                                ("--cache-dir", args.cache_dir is not None),
                                ("--workers", args.workers != 1)) if on]
    if args.select != "measured" and measured:
        raise UsageError(f"{', '.join(measured)} belong(s) to --select measured (the default); "
                         f"--select {args.select} measures nothing: drop one or the other")
    if args.calib:                          # cheap checks before loading the model
        check_paths(args.calib)
    t_all = time.perf_counter()
    times: dict[str, float] = {}
    with stage("load model") as st:
        lm = _resolve(args.model, args.input_shape, args.batch)
        st.detail = f"{lm.name} ({lm.kind}, {type(lm.model).__name__})"
    times["load model"] = st.seconds
    with stage("calibration data") as st:
        batches, calib_text = _calibration(args, lm)
        st.detail = calib_text
    times["calibration data"] = st.seconds
    from archnet_fx.transform import transform

    progress_bars = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    res = transform(lm.model, tgt, batches[0], batches, weight_bits=args.weight_bits,
                    act_bits=args.act_bits, steps=args.steps, holdout=args.holdout,
                    progress=progress_bars, prefer=_prefer(args), choices=args.choice or None,
                    select=args.select, max_seq_len=args.max_seq_len, speedup=args.speedup,
                    latency_budget=args.latency_budget, min_fidelity=args.min_fidelity,
                    workers=args.workers,
                    cache_dir=args.cache_dir)
    times["transform"] = time.perf_counter() - t0
    print(res.report)
    from archnet_fx.export.onnx import export_onnx

    t0 = time.perf_counter()
    rep = export_onnx(res, onnx_path, target=tgt, dynamic_batch=not args.fixed_batch,
                      golden=args.golden)
    times["export"] = time.perf_counter() - t0
    print(f"\nwrote {rep}")
    if args.verbose and rep.exactness is not None:
        print("\n" + rep.exactness.table())
    if args.verbose and rep.layer_sqnr:
        print("\n" + rep.sqnr_table())
    if args.out_dir:
        from archnet_fx.cost.latency import estimate_latency
        from archnet_fx.workflow.artifacts import write_reports

        with stage("reports") as st:
            from archnet_fx.capture import first_sample

            one = first_sample(batches[0])
            bits = dict(weight_bits=res.report.weight_bits, act_bits=res.report.act_bits)
            before = estimate_latency(lm.model, tgt, one, **bits)
            sel = res.report.selection
            after = estimate_latency(res.module, tgt, one, **bits,
                                     layer_bits=sel.layer_bits if sel is not None else None)
            times["total"] = time.perf_counter() - t_all
            written = write_reports(
                args.out_dir, name=lm.name, command="archnet-fx " + " ".join(args.argv),
                result=res, export=rep, latency_before=before, latency_after=after,
                calibration=calib_text, stage_seconds=times)
            st.detail = ", ".join(sorted(written))
        print(f"\nwrote {Path(args.out_dir)}: {onnx_path.name if not args.out else onnx_path}, "
              + ", ".join(sorted(written))
              + f"; estimated speed-up on {tgt.name} {before.total_s / after.total_s:.2f}x")
    return 0


class _DefaultsShown(argparse.HelpFormatter):
    """Appends "(default: X)" where an option has a real default its help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: {d})"


MODEL_HELP = ("built-in name (archnet-fx models), package.module:factory (the current "
              "directory is importable) or a Hugging Face model directory")


def _number(convert: Any, ok: Any, expected: str) -> Any:
    """An argparse ``type``: ``convert(text)`` when it parses and ``ok(value)``, else the error
    "expected <expected>"."""
    def parse(text: str) -> Any:
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v
    return parse


_positive = _number(int, lambda n: n >= 1, "a positive integer")
_share = _number(float, lambda v: 0 <= v < 1, "a share in [0, 1)")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_cosine = _number(float, lambda v: 0 < v < 1, "a cosine between 0 and 1")


def _duration(text: str) -> float:
    """``900us``, ``1.2ms``, ``0.001s`` or a bare number of seconds → seconds."""
    t = text.strip().lower().replace("µs", "us")
    for suffix, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], scale
            break
    else:
        mult = 1.0
    try:
        v = float(t) * mult
    except ValueError:
        v = 0.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 900us, 1.2ms or 0.001s, "
                                          f"got {text!r}")
    return v


def _floats(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got "
                                          f"{text!r}")
    return vals


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


def _surrogate_options(sp: argparse.ArgumentParser, select_help: str,
                       modes: tuple[str, ...] = ("order", "latency")) -> None:
    sp.add_argument("--prefer", default=None, choices=["emulation", "structural"],
                    help="preferred surrogate style (default emulation)")
    sp.add_argument("--choice", action=_Choices, type=_choice, default=None,
                    metavar="KIND_OR_NODE=CANDIDATE",
                    help="pick a candidate for an op kind or one node (repeatable), e.g. "
                    "--choice gelu=hard_gate --choice softmax=softmax_pow")
    sp.add_argument("--select", choices=list(modes), default=modes[0], help=select_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archnet-fx", description=__doc__.split("\n\n")[0])
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="detail: every library log line (INFO), the export's checks")
    loud.add_argument("-q", "--quiet", action="store_true",
                      help="no stage lines or progress bars; warnings and errors only")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("targets", help="list built-in targets").set_defaults(fn=cmd_targets)
    sub.add_parser("models", help="list built-in demo models").set_defaults(fn=cmd_models)
    sp = sub.add_parser("inspect", help="legality and pass diffs of a model on a target")
    sp.add_argument("model", help=MODEL_HELP)
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
    sp.add_argument("model", help=MODEL_HELP)
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
    sp = sub.add_parser("transform", help="transform a model for a target and export ONNX",
                        formatter_class=_DefaultsShown)
    sp.add_argument("model", help=MODEL_HELP)
    sp.add_argument("--target", "-t", required=True, help="target name or path to a .toml")
    sp.add_argument("--out-dir", "-d", metavar="DIR", help="write model.onnx, report.md, "
                    "report.json and figures here (each atomically)")
    sp.add_argument("--out", "-o", metavar="FILE.onnx", help="the ONNX file (atomically); "
                    "default DIR/model.onnx with --out-dir")
    g = sp.add_argument_group("calibration data (unlabeled)")
    g.add_argument("--calib", action="append", default=[], metavar="PATH",
                   help="a text file (one sample per line, tokenized with the model "
                   "directory's tokenizer), a folder of images, or .npy/.npz/.pt tensors "
                   "(.pt loaded with weights_only=True); repeatable")
    g.add_argument("--batch-size", type=_positive, default=16, help="samples per batch")
    g.add_argument("--limit", type=_positive, default=None, help="use the first N samples")
    g.add_argument("--holdout", type=_share, default=0.1,
                   help="share of batches held out to measure fidelity (never trained on)")
    g.add_argument("--seq-len", type=_positive, default=128,
                   help="tokens per text sample (padded and truncated to it)")
    g.add_argument("--image-size", type=_positive, default=None,
                   help="resize images to N x N (default: the model's image processor)")
    g.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]",
                   help="per-channel mean for --image-size (1 value: grayscale; default 0.5)")
    g.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]",
                   help="per-channel std for --image-size (default 0.5)")
    g.add_argument("--random-calib", action="store_true",
                   help="calibrate on random samples shaped like the example (a warning: the "
                   "result fits noise)")
    sp.add_argument("--weight-bits", type=int,
                    help="weight bits of every layer (default: chosen per layer among the "
                    "target's widths by the measured selection, the target's default width "
                    "as the reference)")
    sp.add_argument("--act-bits", type=int, help="activation bits (default: the target's)")
    sp.add_argument("--steps", type=_positive, default=50, help="distillation steps per block")
    sp.add_argument("--batch", type=_positive, default=8,
                    help="batch size of built-in models' examples")
    sp.add_argument("--fixed-batch", action="store_true",
                    help="export the example's batch size (for graphs that pin it)")
    sp.add_argument("--max-seq-len", type=_seq_len, default="auto", metavar="N|auto|none",
                    help="sequence lengths the result takes, 2 to N (auto: the calibration "
                         "data's length for models with token-id inputs; none: fixed)")
    sp.add_argument("--golden", metavar="NPZ",
                    help="also write every Q/DQ tensor of the example run to this .npz")
    sp.add_argument("--input-shape", action="append", default=[],
                    help="shape of a random float input, e.g. 1,3,32,32 (repeat per input)")
    _surrogate_options(sp, "measured (default): every candidate fitted and measured, one "
                       "integer program chooses (see below); order: the first candidate of "
                       "--prefer's order at every node, nothing measured (--prefer structural "
                       "--select order: Arch-Net's forms everywhere); latency: as order, then "
                       "lossless alternatives where the estimate is faster",
                       ("measured", "order", "latency"))
    g = sp.add_argument_group(
        "hardware-aware selection (--select measured, the default; with none of --speedup, "
        "--latency-budget, --min-fidelity: --min-fidelity 0.99, the fastest network that stays "
        "faithful)")
    g.add_argument("--speedup", type=_positive_float, default=None, metavar="X",
                   help="the most faithful network estimated at least X times faster than the "
                   "original on the target")
    g.add_argument("--latency-budget", type=_duration, default=None, metavar="T",
                   help="the most faithful network within T (e.g. 900us, 1.2ms, 0.001s)")
    g.add_argument("--min-fidelity", type=_cosine, default=None, metavar="COS",
                   help="the fastest network whose held-out mean cosine stays >= COS")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep measured candidates here; a new budget on the same model and "
                   "data re-solves without measuring again")
    g.add_argument("--workers", type=_positive, default=1, metavar="N",
                   help="measure candidates in N local processes (torch.distributed, gloo); "
                   "under torchrun the ranks share the work instead")
    sp.set_defaults(fn=cmd_transform)
    return p


#: Warnings that are not the user's business: torch's pytree deprecation, raised from its own
#: pickling of export specs whenever a captured graph is copied (seven times per command).
_NOISE = (("ignore", r".*isinstance\(treespec, LeafSpec\)`? is deprecated", FutureWarning),)


def _logging(args: argparse.Namespace) -> logging.Handler:
    """A stderr handler on the ``archnet_fx`` logger: stage lines by default, everything with
    -v, warnings only with -q. Returned so :func:`main` removes it again."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s"))
    root = logging.getLogger("archnet_fx")
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    levels = {"archnet_fx": logging.INFO if args.verbose else logging.WARNING,
              "archnet_fx.progress": logging.WARNING if args.quiet else logging.INFO,
              "archnet_fx.export": logging.DEBUG if args.verbose else None}
    handler._archnet_saved = {n: logging.getLogger(n).level for n in levels}  # type: ignore
    for name, level in levels.items():
        if level is not None:
            logging.getLogger(name).setLevel(level)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handler = _logging(args)
    try:
        with warnings.catch_warnings():
            for action, message, category in _NOISE:
                warnings.filterwarnings(action, message=message, category=category)
            return int(args.fn(args) or 0)
    except (ArchnetError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:        # `archnet-fx targets | head`: the reader left; not an error
        import os

        sys.stdout = open(os.devnull, "w")   # noqa: SIM115 - python flushes stdout at exit
        return 0
    finally:
        logging.getLogger("archnet_fx").removeHandler(handler)
        for name, level in handler._archnet_saved.items():  # type: ignore[attr-defined]
            logging.getLogger(name).setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
