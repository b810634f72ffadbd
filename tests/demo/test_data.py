"""Real-data loaders: counts, ranges, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from archnet_fx.demo import data

pytest.importorskip("gensim")


def test_lee_background_sentences() -> None:
    sents = data.lee_background_sentences()
    assert len(sents) > 2000
    assert all(s and s == s.strip() and len(s.split()) >= 4 for s in sents)
    assert data.lee_background_sentences() == sents  # deterministic
    assert data.lee_background_sentences(limit=5) == sents[:5]
    sents.clear()  # callers get a copy
    assert len(data.lee_background_sentences(limit=3)) == 3


def test_split_sentences() -> None:
    text = 'He left. "We won," she said. Mr. Howard agreed today. Ok. Why not try again?'
    assert data.split_sentences(text) == [
        '"We won," she said.', "Mr. Howard agreed today.", "Why not try again?"
    ]


def test_lee_documents_and_pairs() -> None:
    docs = data.lee_documents()
    assert len(docs) == 50 and all(len(d.split()) > 20 for d in docs)
    assert any("£" in d for d in docs)  # cp1252 decoding
    pairs = data.lee_similarity_pairs()
    assert len(pairs) == 50 * 49 // 2
    assert all(0 <= i < j < 50 and 0.0 <= s <= 1.0 for i, j, s in pairs)
    assert min(s for _, _, s in pairs) == pytest.approx(0.2)  # 1..5 ratings divided by 5
    mat = data.lee_similarity_matrix()
    assert mat.shape == (50, 50) and np.allclose(mat, mat.T) and np.allclose(np.diag(mat), 1)
    i, j, s = pairs[100]
    assert mat[i, j] == mat[j, i] == s


def test_pang_lee() -> None:
    sents, labels = data.pang_lee_polarity()
    assert len(sents) == len(labels) == 200 and sum(labels) == 100
    assert all(s and not s.startswith("__label__") for s in sents)
    assert data.pang_lee_sentences(limit=3) == sents[:3]


def test_digits() -> None:
    pytest.importorskip("sklearn")
    x, y = data.digits(100)
    assert x.shape == (100, 1, 8, 8) and x.dtype.is_floating_point
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.shape == (100,) and set(y.tolist()) == set(range(10))


def test_missing_gensim_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gensim" else real(n, *a))
    with pytest.raises(ImportError, match="gensim"):
        data.lee_documents()
