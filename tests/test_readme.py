"""The README's API example runs verbatim (it is the first thing a new user tries)."""
from __future__ import annotations

import re
from pathlib import Path

import onnx

import archnet_fx as ax

README = Path(__file__).resolve().parents[1] / "README.md"


def _api_example() -> str:
    text = README.read_text()
    section = text.split("## API", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "README.md has no python block under '## API'"
    return m.group(1)


def test_readme_api_example_runs_verbatim(tmp_path, monkeypatch):
    code = _api_example()
    assert "weight_bits=4" in code and "export_onnx" in code  # the W4 export it promises
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    onnx_files = list(tmp_path.glob("*.onnx"))
    assert len(onnx_files) == 1
    model = onnx.load(onnx_files[0])
    onnx.checker.check_model(model)
    # int4 weights really are int4 in the file
    assert any(i.data_type == onnx.TensorProto.INT4 for i in model.graph.initializer)
    assert scope["res"].report is not None
    assert ax.check(scope["leg"].module, "npu_a").ok     # what the example prints as True
