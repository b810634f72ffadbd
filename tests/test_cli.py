"""The archnet-fx command line, run in-process through archnet_fx.cli.main."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from archnet_fx.demo import zoo
from archnet_fx.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, out, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_targets(capsys):
    code, out, err = run(capsys, "targets")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["target", "#ops"]
    assert [ln.split()[0] for ln in lines[2:]] == ["dsp_c", "npu_a", "npu_b"]


def test_models(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    for name in zoo.list_models():
        assert f"| {name} " in out


def test_inspect_builtin_model_with_pass_detail_and_dot(capsys, tmp_path):
    code, out, err = run(capsys, "inspect", "cnn", "--target", "npu_a",
                         "--pass", "fold_batchnorm", "--dot", str(tmp_path / "dots"))
    assert code == 0, err
    assert out.startswith("# cnn: captured with fx in ")
    sections = [ln for ln in out.splitlines() if ln.startswith("#")]
    assert sections[:4] == ["# cnn: captured with fx in " + sections[0].split(" in ", 1)[1],
                            "## legality before, on npu_a", sections[2], "### fold_batchnorm"]
    assert sections[2].startswith("## pass diffs")
    assert sections[4] == "## legality after, on npu_a"
    assert "target npu_a: " in out
    # the table of every pass's diff, then one pass's detailed diff
    assert "| fold_batchnorm | yes" in out and "fold_bn×2" in out
    for name in ("drop_identity", "fold_constants", "div_to_mul", "decompose_sdpa", "dce"):
        assert f"| {name} " in out
    assert "pass fold_batchnorm: modified in" in out
    assert "replaced: bn1→conv1_bnfold, bn2→conv2_bnfold" in out
    # DOT files before/after
    before, after = tmp_path / "dots" / "cnn.before.dot", tmp_path / "dots" / "cnn.after.dot"
    assert f"wrote {before} and {after}" in out
    b, a = before.read_text(), after.read_text()
    assert b.startswith('digraph "cnn.before" {') and '"bn1"' in b
    assert a.startswith('digraph "cnn.after" {') and '"bn1"' not in a
    assert '"conv1_bnfold" [label="conv1_bnfold\\nconv' in a and "fillcolor" in a


FACTORY_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, x):
            return self.norm(self.lin(x) / 2.0)


    class Bad(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x


    def make():
        torch.manual_seed(0)
        return Tiny().eval(), (torch.randn(2, 8),)


    def model_only():
        return Tiny().eval()


    def bad():
        return Bad(), (torch.randn(2, 8),)


    def weird():
        return 42


    not_callable = 3
''')


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_cli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg_cli.models"
    for name in [m for m in sys.modules if m.startswith("userpkg_cli")]:
        del sys.modules[name]


def test_inspect_package_module_factory(capsys, tmp_path, user_pkg):
    code, out, err = run(capsys, "inspect", f"{user_pkg}:make", "--target", "npu_b",
                         "--dot", str(tmp_path))
    assert code == 0, err
    assert out.startswith(f"# {user_pkg}:make: captured with fx")
    assert "npu_b has no 'layer_norm'" in out  # legality before
    assert "| div_to_mul " in out and "div_const×1" in out
    assert (tmp_path / f"{user_pkg}_make.before.dot").exists()
    assert (tmp_path / f"{user_pkg}_make.after.dot").exists()


def test_inspect_factory_returning_a_model_needs_input_shape(capsys, user_pkg):
    code, out, err = run(capsys, "inspect", f"{user_pkg}:model_only", "--target", "dsp_c")
    assert_usage_error(code, out, err, "--input-shape")
    code, out, err = run(capsys, "inspect", f"{user_pkg}:model_only", "--target", "dsp_c",
                         "--input-shape", "2,8", "--no-verify")
    assert code == 0, err
    assert "captured with fx" in out
    code, out, err = run(capsys, "inspect", f"{user_pkg}:model_only", "--target", "dsp_c",
                         "--input-shape", "2,a")
    assert_usage_error(code, out, err, "--input-shape '2,a'")
    code, out, err = run(capsys, "inspect", f"{user_pkg}:model_only", "--target", "dsp_c",
                         "--input-shape", "0,8")
    assert_usage_error(code, out, err, "positive")


@pytest.mark.parametrize("argv, needles", [
    (["inspect", "cnn", "--target", "npu_z"], ["unknown target 'npu_z'", "npu_a"]),
    (["inspect", "no_such_model", "--target", "npu_a"], ["unknown model 'no_such_model'",
                                                          "cnn"]),
    (["inspect", "no_such_pkg_xyz.mod:f", "--target", "npu_a"], ["cannot import"]),
])
def test_usage_errors_exit_2(capsys, argv, needles):
    code, out, err = run(capsys, *argv)
    assert out == ""  # fails before doing any work
    assert_usage_error(code, out, err, *needles)


def test_factory_errors_exit_2(capsys, user_pkg):
    code, out, err = run(capsys, "inspect", f"{user_pkg}:not_callable", "--target", "npu_a")
    assert_usage_error(code, out, err, "no callable 'not_callable'")
    code, out, err = run(capsys, "inspect", f"{user_pkg}:weird", "--target", "npu_a")
    assert_usage_error(code, out, err, "returned int")


def test_untraceable_model_exits_2_naming_both_causes(capsys, user_pkg):
    code, out, err = run(capsys, "inspect", f"{user_pkg}:bad", "--target", "npu_a")
    assert code == 2
    # torch may log its own lines first; ours is one `error:` message naming both causes
    msg = err[err.index("error: could not capture Bad."):]
    assert "torch.fx.symbolic_trace" in msg and "torch.export" in msg
    assert "models.py:" in msg and "if x.sum() > 0" in msg
    assert sum(ln.startswith("error:") for ln in err.splitlines()) == 1


def test_unknown_pass_name_exits_2(capsys, user_pkg):
    code, out, err = run(capsys, "inspect", f"{user_pkg}:make", "--target", "dsp_c",
                         "--pass", "no_such_pass", "--no-verify")
    assert_usage_error(code, out, err, "--pass 'no_such_pass'", "fold_batchnorm")


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["inspect", "cnn"])  # --target is required
    assert ei.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "archnet-fx")
    if not os.path.exists(exe):
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([exe, "inspect", "cnn", "--target", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown target 'nope'")


def test_candidates_lists_defaults_per_target(capsys):
    from archnet_fx.cli import main

    assert main(["candidates", "--target", "npu_b", "--target", "dsp_c"]) == 0
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3])
            for line in out.splitlines() if line.startswith("| npu_b") or line.startswith("| dsp_c")}
    assert ("npu_b", "layer_norm", "ln_emulate") in rows
    assert ("npu_b", "softmax", "softmax_pwl") in rows
    assert ("dsp_c", "gelu", "native") in rows          # a lookup-table function on the DSP
    assert ("npu_b", "leaky_relu", "relu_exact") in rows  # exact beats emulation
