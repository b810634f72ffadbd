"""The command-line workflow with the user's own model and data (issue 17): every MODEL form,
every --calib form, the --out-dir artifacts, and a typed one-line error per bad file."""
from __future__ import annotations

import json
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch

from archnet_fx.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SENTENCES = [f"sentence number {i} talks about {w} and the weather in {c}."
             for i, (w, c) in enumerate(zip(
                 "rain snow wind sun fog hail storm cloud frost heat ice dew".split() * 3,
                 "oslo rome lima cairo perth quito hanoi dakar riga baku".split() * 4))]

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 16)
            self.norm = nn.LayerNorm(16)
            self.fc2 = nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


    def tiny():
        torch.manual_seed(0)
        return Net(), (torch.randn(2, 12),)


    def bare():
        torch.manual_seed(0)
        return Net()
''')


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(code, out, err, *needles):
    assert code == 2, (out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "archnet_fx.transform →" not in out      # failed before the expensive work
    return lines[0]


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory holding ``mymods_wf.py``; not on sys.path, as for a new user."""
    (tmp_path / "mymods_wf.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    assert str(tmp_path) not in sys.path
    yield tmp_path
    sys.modules.pop("mymods_wf", None)


def _ort_run(path, feeds):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def test_hf_text_directory_with_sentences_writes_every_artifact(capsys, tmp_path, bert_dir):
    txt = tmp_path / "sentences.txt"
    txt.write_text("\n".join(SENTENCES[:20]) + "\n\n")           # a trailing blank line
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "transform", bert_dir, "-t", "npu_a", "--calib", txt,
                            "--seq-len", 16, "--batch-size", 4, "--steps", 2, "--out-dir", out)
    assert code == 0, err
    for name in ("model.onnx", "report.md", "report.json", "block_loss.png",
                 "latency_by_kind.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    cal = rep["transform"]["calibration"]
    assert cal["train_samples"] + cal["holdout_samples"] == 20 and cal["holdout_samples"] > 0
    assert "20 samples from 1 text file(s)" in rep["calibration"]
    assert [f["stage"] for f in rep["transform"]["fidelity"]][-1] == "distilled"
    assert rep["latency"]["speedup"] > 0
    md = (out / "report.md").read_text()
    assert "![block_loss.png](block_loss.png)" in md and "fidelity on held-out batches" in md
    # progress: one line per stage and per block on stderr, no Python warnings
    for needle in (f"load model: {bert_dir}", "calibration data: 20 samples", "capture:",
                   "legalize for npu_a", "block 1/", "fidelity after distillation", "export:"):
        assert needle in err, (needle, err)
    assert "Warning" not in err, err
    # the file runs in onnxruntime on the tokenizer's encoding of a new sentence
    from transformers import AutoTokenizer
    enc = AutoTokenizer.from_pretrained(str(bert_dir))(["an unseen sentence"], padding="max_length",
                                                       max_length=16, return_tensors="np")
    (y,) = _ort_run(out / "model.onnx", {k: v.astype(np.int64) for k, v in enc.items()})[:1]
    assert y.shape == (1, 16, 32) and np.isfinite(y).all()


def test_factory_in_the_current_directory_with_npz_and_out_file(capsys, user_dir):
    x = np.random.default_rng(0).standard_normal((40, 12)).astype(np.float32)
    np.savez(user_dir / "calib.npz", x)                      # saved as arr_0: positional
    code, out, err = run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a", "--calib",
                         "calib.npz", "--batch-size", 8, "--steps", 2, "-o", "tiny.onnx")
    assert code == 0, err
    assert "40 samples from 1 tensor file(s)" in err
    assert "(32 samples) for training, 1 held out (8 samples)" in out
    (y,) = _ort_run(user_dir / "tiny.onnx", {"x": x[:3]})
    assert y.shape == (3, 4)


def test_hf_image_directory_with_a_folder_of_images(capsys, tmp_path, vit_dir, image_folder):
    out = tmp_path / "vit_out"
    code, stdout, err = run(capsys, "transform", vit_dir, "-t", "npu_a", "--calib", image_folder,
                            "--batch-size", 4, "--steps", 2, "--out-dir", out)
    assert code == 0, err
    assert "12 samples from 1 image folder(s)" in err
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "report.md", "report.json",
                                               "block_loss.png", "latency_by_kind.png"}
    (y,) = _ort_run(out / "model.onnx", {"pixel_values": np.zeros((2, 3, 32, 32), np.float32)}
                    )[:1]
    assert y.shape[0] == 2


def test_tensor_files_npy_and_pt(user_dir):
    from archnet_fx.workflow.calib import load_calibration
    from archnet_fx.workflow.models import resolve_model

    lm = resolve_model("mymods_wf:tiny")
    np.save(user_dir / "a.npy", np.ones((10, 12), np.float64))
    torch.save([torch.zeros(6, 12)], user_dir / "b.pt")
    data = load_calibration(["a.npy", "b.pt"], lm, batch_size=4, limit=14)
    assert data.samples == 14 and [b[0].shape[0] for b in data.batches] == [4, 4, 4, 2]
    assert data.batches[0][0].dtype == torch.float32            # float64 arrays become float32
    torch.save({"x": torch.zeros(3, 12)}, user_dir / "c.pt")     # named after forward's x
    assert set(load_calibration(["c.pt"], lm).batches[0]) == {"x"}


def test_text_needs_a_tokenizer_and_random_calib_is_explicit(capsys, user_dir):
    (user_dir / "s.txt").write_text("hello\n")
    one_error(*run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a", "--calib", "s.txt",
                   "-o", "m.onnx"), "s.txt", "needs a tokenizer")
    one_error(*run(capsys, "transform", "mymods_wf:bare", "-t", "npu_a", "--input-shape", "2,12",
                   "-o", "m.onnx"), "--random-calib")
    one_error(*run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a"), "--out-dir")
    code, out, err = run(capsys, "transform", "mymods_wf:bare", "-t", "npu_a", "--input-shape",
                         "2,12", "--random-calib", "--limit", 16, "--batch-size", 8, "--steps", 1,
                         "-o", "r.onnx")
    assert code == 0, err
    assert "--random-calib: calibrating on random samples" in err


class Opaque:
    pass


def _bad_files(d):
    """name -> (path to pass to --calib, what the error names)"""
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n  \n\n")
    (d / "binary.txt").write_bytes(b"good line\n\xff\xfe\x00\x81 bad\n")
    imgs = d / "imgs"
    imgs.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(imgs / "ok.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "no_images").mkdir()
    np.save(d / "wrong.npy", np.zeros((5, 7), np.float32))
    np.save(d / "nan.npy", np.array([[0.0] * 12, [np.nan] + [0.0] * 11], np.float32))
    np.savez(d / "names.npz", pixels=np.zeros((4, 12)), extra=np.zeros((4, 2)))
    np.savez(d / "ragged.npz", np.zeros((4, 12)), np.zeros((3, 12)))
    (d / "pickled.pt").write_bytes(pickle.dumps(Opaque()))
    torch.save({"x": torch.zeros(2, 12), "opaque": Opaque()}, d / "object.pt")
    (d / "trunc.npy").write_bytes(b"\x93NUMPY garbage")
    (d / "empty.pt").write_bytes(b"")
    (d / "zip.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.save(d / "strings.npy", np.array(["a", "b"]))
    torch.save({0: torch.zeros(2, 12)}, d / "intkeys.pt")
    return {
        "empty": ("empty.txt", ["empty.txt", "no text"]),
        "blank": ("blank.txt", ["blank.txt", "no text"]),
        "binary": ("binary.txt", ["binary.txt, line 2", "not UTF-8"]),
        "broken image": ("imgs", ["broken.png", "unreadable"]),
        "no images": ("no_images", ["no_images", "no images"]),
        "wrong shape": ("wrong.npy", ["wrong.npy", "(7,)", "(12,)"]),
        "nan": ("nan.npy", ["nan.npy", "sample 1"]),
        "unknown names": ("names.npz", ["names.npz", "pixels", "forward"]),
        "ragged": ("ragged.npz", ["ragged.npz", "different numbers of samples"]),
        "pickle": ("pickled.pt", ["pickled.pt", "weights_only=True"]),
        "object": ("object.pt", ["object.pt", "weights_only=True"]),
        "truncated": ("trunc.npy", ["trunc.npy", "not a readable .npy"]),
        "missing": ("nowhere.npz", ["nowhere.npz", "no such file"]),
        "empty pt": ("empty.pt", ["empty.pt", "weights_only=True"]),
        "corrupt npz": ("zip.npz", ["zip.npz", "not a readable .npz"]),
        "strings": ("strings.npy", ["strings.npy", "give numbers"]),
        "int keys": ("intkeys.pt", ["intkeys.pt", "key 0"]),
    }


@pytest.mark.parametrize("case", ["empty", "blank", "binary", "broken image", "no images",
                                  "wrong shape", "nan", "unknown names", "ragged", "pickle",
                                  "object", "truncated", "missing", "empty pt", "corrupt npz",
                                  "strings", "int keys"])
def test_bad_calibration_files_get_one_typed_error(capsys, user_dir, bert_dir, case):
    path, needles = _bad_files(user_dir)[case]
    model = bert_dir if path.endswith(".txt") else "mymods_wf:tiny"
    extra = ["--image-size", "8", "--mean", "0.5", "--std", "0.5"] if "image" in case else []
    # a 12-feature model takes neither 8 x 8 images nor these tensors: the file is named first
    one_error(*run(capsys, "transform", model, "-t", "npu_a", "--calib", path, *extra,
                   "-o", "m.onnx"), *needles)


def test_mixed_forms_and_bad_options(capsys, user_dir):
    (user_dir / "s.txt").write_text("a\n")
    np.save(user_dir / "a.npy", np.zeros((2, 12), np.float32))
    one_error(*run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a", "--calib", "s.txt",
                   "--calib", "a.npy", "-o", "m.onnx"), "mix forms")
    (user_dir / "imgs").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(user_dir / "imgs" / "a.png")
    one_error(*run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a", "--calib", "imgs",
                   "-o", "m.onnx"), "--image-size")
    with pytest.raises(SystemExit):
        main(["transform", "mymods_wf:tiny", "-t", "npu_a", "--holdout", "1.5", "-o", "m.onnx"])


def test_hf_directory_errors(capsys, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    one_error(*run(capsys, "inspect", tmp_path / "empty_dir", "-t", "npu_a"), "config.json")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "bert"}')
    one_error(*run(capsys, "inspect", tmp_path / "noweights", "-t", "npu_a"), "no weights")


def test_selection_flags_write_the_front(capsys, user_dir):
    x = np.random.default_rng(1).standard_normal((48, 12)).astype(np.float32)
    np.save(user_dir / "x.npy", x)
    code, out, err = run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a", "--calib", "x.npy",
                         "--batch-size", 8, "--steps", 2, "--min-fidelity", "0.99",
                         "--out-dir", "sel")
    assert code == 0, err
    assert "selection: predicted" in out
    assert (user_dir / "sel" / "selection_front.png").is_file()
    rep = json.loads((user_dir / "sel" / "report.json").read_text())
    sel = rep["transform"]["selection"]
    assert len(sel["chosen"]) == 2            # the LayerNorm and the GELU
    assert sel["assembled_cosine"] >= 0.99
    with pytest.raises(SystemExit):
        main(["transform", "mymods_wf:tiny", "-t", "npu_a", "--latency-budget", "fast",
              "-o", "m.onnx"])


def test_selection_flags_with_select_order_fail_before_the_model_loads(capsys, user_dir,
                                                                        monkeypatch):
    import archnet_fx.workflow.models as models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(models, "load_hf_dir", boom)
    one_error(*run(capsys, "transform", "./some_dir", "-t", "npu_a", "--select", "order",
                   "--speedup", "3", "--workers", "2", "-o", "m.onnx"),
              "--speedup, --workers", "--select measured")


def test_factory_importing_its_neighbour_and_failing_factories(capsys, user_dir):
    (user_dir / "helper_wf.py").write_text("import torch\nfrom torch import nn\n"
                                          "def make():\n    return nn.Linear(12, 4)\n")
    (user_dir / "uses_wf.py").write_text(
        "import torch\ndef tiny():\n    from helper_wf import make\n"
        "    return make(), (torch.randn(2, 12),)\n"
        "def broken():\n    raise RuntimeError('no weights here')\n")
    code, out, err = run(capsys, "inspect", "uses_wf:tiny", "-t", "npu_a", "--no-verify")
    assert code == 0, err
    one_error(*run(capsys, "inspect", "uses_wf:broken", "-t", "npu_a"),
              "uses_wf:broken", "RuntimeError", "no weights here")
    for m in ("uses_wf", "helper_wf"):
        sys.modules.pop(m, None)


def test_mixed_forms_fail_before_the_model_loads(capsys, user_dir, monkeypatch):
    import archnet_fx.workflow.models as models

    (user_dir / "s.txt").write_text("a\n")
    np.save(user_dir / "a.npy", np.zeros((2, 12), np.float32))

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the calibration files were checked")
    monkeypatch.setattr(models, "load_hf_dir", boom)
    monkeypatch.setattr(models, "_load_factory", boom)
    one_error(*run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a", "--calib", "s.txt",
                   "--calib", "a.npy", "-o", "m.onnx"), "mix forms")
    one_error(*run(capsys, "transform", "mymods_wf:tiny", "-t", "npu_a", "--calib", "a.npy",
                   "--random-calib", "-o", "m.onnx"), "--random-calib")


def test_tokenizers_without_a_pad_token_pad_with_end_of_sequence():
    from types import SimpleNamespace

    from archnet_fx.errors import CalibrationError
    from archnet_fx.workflow.calib import ensure_padding

    tok = SimpleNamespace(pad_token=None, eos_token="<|endoftext|>")
    ensure_padding(tok, "gpt-like")
    assert tok.pad_token == "<|endoftext|>"
    with pytest.raises(CalibrationError, match="neither a pad nor an end-of-sequence"):
        ensure_padding(SimpleNamespace(pad_token=None, eos_token=None), "bare")
