"""Every user-caused error is an ``ArchnetError`` subclass, raised before expensive work, naming
what was wrong and the fix; on every error path the caller's model, global state (RNG, threads,
GC) and existing files are untouched and no temp file is left.

``before_capture`` patches capture to fail: an error that must come before any expensive work
is raised before the model is captured.
"""
from __future__ import annotations

import gc
import importlib
import os

import pytest
import torch

import archnet_fx as ax
from archnet_fx.demo import zoo

tr = importlib.import_module("archnet_fx.transform")


@pytest.fixture
def before_capture(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("capture started before the error was raised")
    monkeypatch.setattr(tr, "as_graph_module", fail)


@pytest.fixture
def untouched(tmp_path):
    """Yields (model, example); afterwards checks nothing was lost."""
    torch.manual_seed(123)
    model, ex = zoo.get_model("mlp", batch_size=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng, threads, gc_on = torch.get_rng_state(), torch.get_num_threads(), gc.isenabled()
    files = sorted(os.listdir(tmp_path))
    yield model, ex
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_num_threads() == threads and gc.isenabled() == gc_on
    assert sorted(os.listdir(tmp_path)) == files


def _batches(n=3, b=4):
    g = torch.Generator().manual_seed(0)     # not the global RNG, which must stay untouched
    return [(torch.randn(b, 32, generator=g),) for _ in range(n)]


@pytest.mark.parametrize("option, value, match", [
    ("mode", "sideways", r"DistillOptions.mode must be one of"),
    ("prefer", "fastest", r"prefer must be one of"),
    ("holdout", 1.5, r"holdout must be"),
    ("granularity", 0, r"granularity must be a positive integer"),
    ("select", "cheapest", r"select must be"),
    ("cut_nodes", "fc1", r"cut_nodes must be a list"),
    ("epochs", 0, r"DistillOptions.epochs"),
    ("quantize_surrogates", "some", r"quantize_surrogates must be"),
    ("stepz", 3, r"unknown option\(s\) stepz"),
])
def test_bad_options_are_option_errors_before_capture(untouched, before_capture, option, value,
                                                      match):
    model, ex = untouched
    with pytest.raises(ax.OptionError, match=match):
        ax.transform(model, "npu_a", ex, _batches(), steps=1, **{option: value})


@pytest.mark.parametrize("kw, err, match", [
    ({"weight_bits": 4.0}, ax.BitWidthError, r"weight_bits must be an int.*allowed: "),
    ({"act_bits": "8"}, ax.BitWidthError, r"act_bits must be an int"),
    ({"weight_bits": 3}, ax.BitWidthError, r"does not support weight_bits=3"),
])
def test_bit_widths(untouched, before_capture, kw, err, match):
    model, ex = untouched
    with pytest.raises(err, match=match):
        ax.transform(model, "npu_a", ex, _batches(), **kw)


def test_target_of_the_wrong_type(untouched, before_capture):
    model, ex = untouched
    with pytest.raises(ax.TargetError, match="built-in name, a path to a .toml file"):
        ax.transform(model, 42, ex, _batches())
    with pytest.raises(ax.TargetError, match="unknown target 'npu_z'"):
        ax.transform(model, "npu_z", ex, _batches())


def test_unavailable_device(untouched, before_capture):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model, ex = untouched
    with pytest.raises(ax.DeviceError, match=r"device 'cuda' is not available.*device='cpu'"):
        ax.transform(model, "npu_a", ex, _batches(), device="cuda")


def test_checkpoint_dir_that_is_a_file(untouched, before_capture, tmp_path):
    model, ex = untouched
    f = tmp_path / "ckpt"
    f.write_text("not a directory")
    with pytest.raises(ax.CheckpointError, match="is a file, not a directory"):
        ax.transform(model, "npu_a", ex, _batches(), checkpoint_dir=f)
    with pytest.raises(ax.CheckpointError, match="is a file, so the directory cannot be created"):
        ax.transform(model, "npu_a", ex, _batches(), checkpoint_dir=f / "sub")
    assert f.read_text() == "not a directory"
    f.unlink()


def test_checkpoint_of_other_settings_refused_before_capture(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, ex = zoo.get_model("mlp", batch_size=4)
    batches = _batches()
    ckpt = tmp_path / "ck"
    ax.transform(model, "npu_a", ex, batches, steps=1, checkpoint_dir=ckpt, progress=False)
    saved = sorted(os.listdir(ckpt))
    monkeypatch.setattr(tr, "as_graph_module", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("capture started before the error was raised")))
    with pytest.raises(ax.CheckpointError, match=r"other settings \(they differ in: bits\)"):
        ax.transform(model, "npu_a", ex, batches, steps=1, weight_bits=4, checkpoint_dir=ckpt,
                     progress=False)
    with pytest.raises(ax.CheckpointError, match=r"differ in: options"):
        ax.transform(model, "npu_a", ex, batches, steps=2, checkpoint_dir=ckpt, progress=False)
    assert sorted(os.listdir(ckpt)) == saved


def test_float_token_ids_are_input_errors():
    pytest.importorskip("transformers")
    model, ex = zoo.get_model("bert_tiny")
    bad = {k: v.float() for k, v in ex.items()}
    with pytest.raises(ax.InputError, match=r"(?s)fails on the example inputs themselves.*"
                                            r"input_ids: \(2, 16\) torch.float32"):
        ax.capture(model, bad)
    gm = ax.capture(model, ex)
    with pytest.raises(ax.InputError, match=r"input 'input_ids' has dtype torch.float32 but the "
                                            r"captured graph takes torch.int64"):
        gm(**bad)


def test_calibration_batch_of_the_wrong_dtype(untouched, monkeypatch):
    model, ex = untouched
    monkeypatch.setattr(tr, "distill", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("training started before the error was raised")))
    with pytest.raises(ax.CalibrationError, match=r"batch 1: input 'input' has dtype torch.float64.*"
                                                  r"convert it with .to\(torch.float32\)"):
        ax.transform(model, "npu_a", ex, [_batches(1)[0], (_batches(1)[0][0].double(),)])


def test_runtime_input_of_the_wrong_dtype():
    model, ex = zoo.get_model("mlp", batch_size=4)
    gm = ax.capture(model, ex)
    with pytest.raises(ax.InputError, match=r"convert it with .to\(torch.float32\)"):
        gm(ex[0].double())


@pytest.fixture
def converted(tmp_path):
    from qdq_models import fake_quant
    gm, ex = fake_quant("mlp", "npu_a")
    return gm


def test_export_path_is_a_directory(converted, tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    with pytest.raises(ax.ExportError, match=r"is a directory; pass a file name such as"):
        ax.export_onnx(converted, d, target="npu_a")
    assert os.listdir(d) == []


def test_export_parent_is_a_file(converted, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ax.ExportError, match=r"is a file, not a directory"):
        ax.export_onnx(converted, f / "m.onnx", target="npu_a")
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes anywhere")
def test_export_unwritable_directory(converted, tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ax.ExportError, match=r"is not writable"):
            ax.export_onnx(converted, d / "m.onnx", target="npu_a")
    finally:
        d.chmod(0o700)


def test_export_input_of_the_wrong_dtype(converted, tmp_path):
    with pytest.raises(ax.InputError, match=r"input 'input' has dtype torch.float64"):
        ax.export_onnx(converted, tmp_path / "m.onnx", target="npu_a",
                       example_inputs=(_batches(1)[0][0].double(),))
    assert os.listdir(tmp_path) == []


def test_legalize_options(untouched):
    model, ex = untouched
    with pytest.raises(ax.OptionError, match="threads must be a positive integer"):
        ax.legalize(model, "npu_a", ex, threads=0)
    with pytest.raises(ax.OptionError, match="select must be one of"):
        ax.legalize(model, "npu_a", ex, select="fast")
    with pytest.raises(ax.OptionError, match="method must be"):
        ax.capture(model, ex, method="jit")


@pytest.mark.parametrize("kw, match", [
    ({"opset": "17"}, "opset must be an integer from 13"),
    ({"opset": 9}, "opset must be an integer from 13"),
    ({"atol": -1}, "atol must be a finite number"),
    ({"max_flip_fraction": 2}, "max_flip_fraction must be"),
    ({"dynamic_batch": "yes"}, "dynamic_batch must be True or False"),
])
def test_export_options(converted, tmp_path, kw, match):
    with pytest.raises(ax.OptionError, match=match):
        ax.export_onnx(converted, tmp_path / "m.onnx", target="npu_a", **kw)
    assert os.listdir(tmp_path) == []


def test_export_input_of_the_wrong_shape(converted, tmp_path):
    with pytest.raises(ax.InputError, match=r"input 'input' has shape \(4, 16\) but the model "
                                            r"was captured with \(4, 32\)"):
        ax.export_onnx(converted, tmp_path / "m.onnx", target="npu_a",
                       example_inputs=(_batches(1)[0][0][:, :16],))
    assert os.listdir(tmp_path) == []
