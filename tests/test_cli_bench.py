"""``archnet-fx bench``: the latency estimate from the command line."""
from __future__ import annotations

import pytest

from archnet_fx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_original(capsys):
    code, out, err = run(capsys, "bench", "mlp", "--target", "npu_a", "--batch", "4")
    assert code == 0 and err == ""
    assert out.startswith("# mlp on npu_a: original")
    assert "target npu_a (W8A8)" in out and "| linear" in out
    assert "legalized" not in out


def test_bench_legalized_side_by_side(capsys):
    code, out, _ = run(capsys, "bench", "vit", "--target", "npu_a", "--transformed")
    assert code == 0
    assert "# vit on npu_a: legalized" in out and "# side by side" in out
    assert "speed-up: " in out
    line = next(ln for ln in out.splitlines() if ln.startswith("| fallback regions"))
    assert int(float(line.split("|")[3])) == 0   # nothing left on the host after legalizing


def test_bench_errors(capsys):
    code, _, err = run(capsys, "bench", "mlp", "--target", "nope")
    assert code == 2 and err.startswith("error: ") and "unknown target" in err
    code, _, err = run(capsys, "bench", "mlp", "--target", "npu_b", "--weight-bits", "4")
    assert code == 2 and "weight_bits=4" in err


def test_bench_select_latency_is_never_slower(capsys):
    def legalized_total(*extra):
        code, out, _ = run(capsys, "bench", "decoder", "--target", "npu_b", "--legalize", *extra)
        assert code == 0
        line = next(ln for ln in out.splitlines() if ln.startswith("| total us"))
        return float(line.split("|")[3])
    order, fast = legalized_total(), legalized_total("--select", "latency")
    assert fast < order  # the decoder's embedding looked up on the host instead of one-hot


def test_bench_choices_and_prefer(capsys):
    """--choice KIND=CANDIDATE and --prefer reach legalize: the chosen candidates are listed,
    and the structural forms (fused epilogues) estimate below the default emulation and the
    CPU-cheap choices (whose power kernel is five unfused elementwise kernels on npu_a)."""
    def legalized(*extra):
        code, out, _ = run(capsys, "bench", "vit", "--target", "npu_a", "--legalize", *extra)
        assert code == 0
        line = next(ln for ln in out.splitlines() if ln.startswith("| total us"))
        return out, float(line.split("|")[3])
    out, default = legalized()
    assert "hard_gate" not in out
    out, gated = legalized("--choice", "gelu=hard_gate", "--choice", "softmax=softmax_pow")
    assert "hard_gate ×" in out and "softmax_pow ×" in out
    _, structural = legalized("--prefer", "structural")
    assert structural < min(default, gated) and gated != default
    code, _, err = run(capsys, "bench", "vit", "--target", "npu_a", "--legalize", "--choice",
                       "gelu=nope")
    assert code == 2 and err.startswith("error: ") and "hard_gate (structural)" in err
    with pytest.raises(SystemExit) as ei:   # argparse: usage line, exit status 2
        main(["bench", "vit", "--target", "npu_a", "--legalize", "--choice", "gelu"])
    assert ei.value.code == 2 and "KIND_OR_NODE=CANDIDATE" in capsys.readouterr().err
