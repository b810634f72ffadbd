"""``archnet_fx.transform`` (archnet_fx/transform.py): the pipeline end to end, and its errors.

Every error a user can cause — empty, non-finite or mis-shaped calibration data, bit widths the
target lacks, bad options — is raised before any training (``distill`` is patched to fail if it
is reached).
"""
from __future__ import annotations

import importlib

import pytest
import torch

import archnet_fx as ax
from archnet_fx.demo import zoo
from archnet_fx.transform import TransformResult, transform

tr = importlib.import_module("archnet_fx.transform")  # the module (ax.transform is the function)


def _mlp_batches(n=5, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 32, generator=g),) for _ in range(n)]


def _bert_batches(n=4, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        e = dict(zoo.MODELS["bert_tiny"].example_inputs(b))
        e["input_ids"] = torch.randint(0, 1000, e["input_ids"].shape, generator=g
                                       ).masked_fill(e["attention_mask"] == 0, 0)
        out.append(e)
    return out


@pytest.fixture
def no_training(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("training started before the error was raised")
    monkeypatch.setattr(tr, "distill", fail)


def test_mlp_end_to_end_w4a8():
    model, ex = zoo.get_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = transform(model, "npu_a", ex, _mlp_batches(), weight_bits=4, act_bits=8, steps=20,
                    progress=False)
    assert isinstance(res, TransformResult)
    # the caller's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(3, 32)
    with torch.no_grad():
        out, ref = res.module(x), model(x)
    assert out.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(out, ref).mean() > 0.97
    rep = res.report
    assert (rep.weight_bits, rep.act_bits, rep.target) == (4, 8, "npu_a")
    assert rep.after.ok
    assert [r.name for r in res.records][-1] == "fake_quant"
    assert rep.fidelity_of("distilled")[0]["cosine"] > 0.97
    # three stages on the held-out batch: what legalization, quantization and training did
    stages = [rep.fidelity_of(s) for s in ("legalized (float, untrained)",
                                           "quantized, calibrated (before distillation)",
                                           "distilled")]
    assert all(len(s) == 1 for s in stages)
    legal, quant, dist = (s[0]["nmse"] for s in stages)
    assert legal < quant and dist < quant  # W4 costs something; training buys some back
    # each block's loss is measured on the held-out batch, before and after: it dropped, or
    # the report says why not (32 random training samples can overfit a W4 layer)
    assert all(b.loss_after < b.loss_before or "kept" in b.note for b in rep.distill.blocks)
    assert any(b.loss_after < b.loss_before for b in rep.distill.blocks)
    assert rep.calibration == {"train_batches": 4, "holdout_batches": 1, "train_samples": 32,
                               "holdout_samples": 8}
    text = str(rep)
    for part in ("legality", "blocks:", "distillation:", "fidelity on held-out", "time:"):
        assert part in text
    assert "W4" in res.diff("fake_quant")


def test_bert_tiny_end_to_end_same_calling_convention():
    model, ex = zoo.get_model("bert_tiny")
    res = transform(model, "npu_a", ex, _bert_batches(), steps=6, allow_host_fallback=True,
                    progress=False, mode="independent", verify=False)
    with torch.no_grad():
        out, ref = res.module(**ex), model(**ex)
    assert type(out) is type(ref)  # a ModelOutput like the original's
    cos = torch.nn.functional.cosine_similarity(out.last_hidden_state.flatten(1),
                                                ref.last_hidden_state.flatten(1))
    assert cos.mean() > 0.95
    assert len(res.report.distill.blocks) == 3 and res.report.mode == "independent"
    assert res.report.before.unsupported and not res.report.after.unsupported


def test_deterministic_for_a_seed():
    model, ex = zoo.get_model("mlp")
    a = transform(model, "npu_a", ex, _mlp_batches(), steps=5, progress=False, seed=3)
    b = transform(model, "npu_a", ex, _mlp_batches(), steps=5, progress=False, seed=3)
    for (k, v), (k2, v2) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_interrupted_transform_resumes_to_the_same_result(tmp_path):
    model, ex = zoo.get_model("mlp")
    kw = dict(steps=6, progress=False, seed=1)
    full = transform(model, "npu_a", ex, _mlp_batches(), **kw)
    part = transform(model, "npu_a", ex, _mlp_batches(), checkpoint_dir=tmp_path, stop_after=1,
                     **kw)
    assert not part.report.distill.complete and "stopped early" in str(part.report)
    done = transform(model, "npu_a", ex, _mlp_batches(), checkpoint_dir=tmp_path, **kw)
    assert done.report.distill.resumed_from == 1
    for (k, v), v2 in zip(full.module.state_dict().items(), done.module.state_dict().values()):
        assert torch.equal(v, v2), k


def test_missing_calib_data_warns_loudly():
    model, ex = zoo.get_model("mlp")
    with pytest.warns(UserWarning, match="no calib_data"):
        res = transform(model, "npu_a", ex, None, steps=2, progress=False)
    assert any("example inputs" in n for n in res.report.notes)


def test_example_inputs_from_first_batch():
    model, _ = zoo.get_model("mlp")
    res = transform(model, "npu_a", calib_data=_mlp_batches(3), steps=2, progress=False)
    assert res.module(torch.randn(2, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("calib,match", [
    ([], "empty"),
    ([(torch.full((8, 32), float("nan")),)], "NaN"),
    ([(torch.randn(8, 32),), (torch.randn(8, 31),)], r"batch 1: input 'input' has shape \(8, 31\)"),
    ([(torch.randn(8, 32, 1),)], "shape"),
    ([("not a tensor",)], "calibration batch 0"),
    ("text", "string"),
    (42, "not an iterable"),
])
def test_bad_calibration_data(no_training, calib, match):
    model, ex = zoo.get_model("mlp")
    with pytest.raises(ax.CalibrationError, match=match):
        transform(model, "npu_a", ex, calib, progress=False)


def test_bad_calibration_dict_inputs(no_training):
    model, ex = zoo.get_model("bert_tiny")
    bad = dict(ex)
    bad["attention_mask"] = bad["attention_mask"][:, :8]
    with pytest.raises(ax.CalibrationError, match="attention_mask"):
        transform(model, "npu_a", ex, [ex, bad], progress=False)
    missing = {k: v for k, v in ex.items() if k != "token_type_ids"}
    with pytest.raises(ax.CalibrationError, match="no input 'token_type_ids'"):
        transform(model, "npu_a", ex, [missing], progress=False)


@pytest.mark.parametrize("target,w,a", [("npu_a", 3, 8), ("npu_a", 8, 16), ("npu_b", 4, 8)])
def test_bad_bits(no_training, target, w, a):
    model, ex = zoo.get_model("mlp")
    with pytest.raises(ax.BitWidthError, match="does not support"):
        transform(model, target, ex, _mlp_batches(), weight_bits=w, act_bits=a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="fast"), "DistillOptions.mode"),
    (dict(epochs=0), "DistillOptions.epochs"),
    (dict(lr_weight=-1.0), "DistillOptions.lr_weight"),
    (dict(learning_rate=1e-3), "unknown option"),
    (dict(holdout=1.5), "holdout"),
    (dict(quantize_surrogates="most"), "quantize_surrogates"),
    (dict(granularity=0), "granularity"),
])
def test_bad_options(no_training, kwargs, match):
    model, ex = zoo.get_model("mlp")
    with pytest.raises(ValueError, match=match):
        transform(model, "npu_a", ex, _mlp_batches(), progress=False, **kwargs)


def test_unknown_target():
    model, ex = zoo.get_model("mlp")
    with pytest.raises(ax.TargetError):
        transform(model, "npu_zz", ex, _mlp_batches())
