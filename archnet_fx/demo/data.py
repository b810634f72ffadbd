"""Real-data loaders: sentences, documents, human similarity ratings and small images.

Everything here reads data that ships inside installed wheels, so it works offline:

* gensim's test data (``gensim.test.utils.datapath``):

  - ``lee_background.cor`` -- 300 Australian news documents, one per line (ASCII).
    :func:`lee_background_sentences` splits them into sentences.
  - ``lee.cor`` -- the 50 documents of the Lee, Pincombe & Welsh (2005) similarity study,
    one per line, cp1252-encoded (one ``£``), no trailing newline. :func:`lee_documents`.
  - ``similarities0-1.txt`` -- the human ratings of those 50 documents: a 50x50
    tab-separated, *upper-triangular* matrix. Row ``i`` column ``j > i`` holds the mean
    rating of documents ``i`` and ``j``; the diagonal is ``1`` and everything below it is
    ``0`` (a placeholder, not a rating). Ratings were given on a 1..5 scale and are stored
    divided by 5, so off-diagonal values lie in ``[0.2, 1.0]``.
    :func:`lee_similarity_pairs` returns the 1225 pairs ``(i, j, score)`` with ``i < j``;
    :func:`lee_similarity_matrix` the symmetric matrix.
  - ``pang_lee_polarity.cor`` -- 200 lower-cased, tokenised movie-review snippets, each
    prefixed ``__label__neg`` / ``__label__pos`` (cp1252). :func:`pang_lee_sentences`,
    :func:`pang_lee_polarity`.

* scikit-learn's bundled 8x8 handwritten digits: :func:`digits`.

Only torch/numpy/stdlib are imported at module level; gensim and sklearn are imported
inside the functions and a missing one raises an ``ImportError`` naming the package.
All loaders are deterministic (file order) and return fresh lists the caller may mutate.

>>> docs = lee_documents()
>>> len(docs)
50
>>> pairs = lee_similarity_pairs()
>>> len(pairs), pairs[0][:2]
(1225, (0, 1))
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "lee_background_sentences",
    "lee_documents",
    "lee_similarity_pairs",
    "lee_similarity_matrix",
    "pang_lee_sentences",
    "pang_lee_polarity",
    "digits",
    "split_sentences",
]

_GENSIM_HINT = "install it with `pip install -c constraints.txt gensim`"

# Sentence boundary: '.', '!' or '?' (optionally followed by a closing quote), then
# whitespace, then a capital letter (optionally preceded by an opening quote).
# A few honorifics are excluded so "Mr. Howard" stays one sentence.
_SENTENCE_BOUNDARY = re.compile(
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bMt\.)"
    r"(?:(?<=[.!?])|(?<=[.!?][\"']))"
    r"\s+"
    r"(?=[\"']?[A-Z])"
)


def _gensim_file(name: str) -> Path:
    """Path of a file in gensim's bundled test data; clear errors when unavailable.

    Same path as ``gensim.test.utils.datapath(name)``, found without importing gensim
    (importing it costs over a second).
    """
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"archnet_fx.demo.data needs the 'gensim' package for {name!r}; {_GENSIM_HINT}"
        )
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    path = data_dir / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{name!r} is not in gensim's test data ({data_dir}); "
            "this gensim build does not ship it"
        )
    return path


def _read_lines(name: str) -> tuple[str, ...]:
    # cp1252 covers the few non-ASCII bytes in these corpora (0xA3 '£', 0x97 '—', 0xE9 'é').
    text = _gensim_file(name).read_bytes().decode("cp1252", errors="replace")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """Split ``text`` on ``. ! ?`` followed by space and a capital; drop short pieces.

    >>> split_sentences("It rained. Dr. Smith came home! Ok. Why did it rain so much?")
    ['Dr. Smith came home!', 'Why did it rain so much?']
    """
    pieces = (p.strip() for p in _SENTENCE_BOUNDARY.split(text))
    return [p for p in pieces if len(p.split()) >= min_words]


@functools.lru_cache(maxsize=None)
def _lee_background_sentences() -> tuple[str, ...]:
    out: list[str] = []
    for doc in _read_lines("lee_background.cor"):
        out.extend(split_sentences(doc))
    return tuple(out)


def lee_background_sentences(limit: int | None = None) -> list[str]:
    """Sentences of gensim's ``lee_background.cor`` (300 news documents), in file order.

    Documents are split with :func:`split_sentences`; pieces under 4 words are dropped.
    ``limit`` keeps the first ``limit`` sentences.
    """
    sents = _lee_background_sentences()
    return list(sents if limit is None else sents[:limit])


def lee_documents() -> list[str]:
    """The 50 documents of gensim's ``lee.cor``, the ones rated in ``similarities0-1.txt``."""
    docs = list(_read_lines("lee.cor"))
    if len(docs) != 50:
        raise ValueError(f"lee.cor: expected 50 documents, found {len(docs)}")
    return docs


@functools.lru_cache(maxsize=None)
def _lee_matrix() -> np.ndarray:
    path = _gensim_file("similarities0-1.txt")
    rows = [line.split() for line in path.read_text(encoding="ascii").splitlines() if line.strip()]
    try:
        mat = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: expected a matrix of floats ({exc})") from exc
    if mat.shape != (50, 50):
        raise ValueError(f"{path}: expected a 50x50 matrix, found shape {mat.shape}")
    return mat


def lee_similarity_pairs() -> list[tuple[int, int, float]]:
    """Human similarity ratings of the :func:`lee_documents`, as ``(i, j, score)``, ``i < j``.

    ``similarities0-1.txt`` is a 50x50 tab-separated upper-triangular matrix: entry
    ``[i][j]`` for ``j > i`` is the mean human rating (1..5 scale, divided by 5) of
    documents ``i`` and ``j`` of ``lee.cor``; the diagonal is 1 and the lower triangle is 0
    filler. Returns all 1225 pairs in row-major order; scores lie in ``[0, 1]``.
    """
    mat = _lee_matrix()
    n = mat.shape[0]
    return [(i, j, float(mat[i, j])) for i in range(n) for j in range(i + 1, n)]


def lee_similarity_matrix() -> np.ndarray:
    """The ratings as a symmetric 50x50 float64 array (diagonal 1); a fresh copy."""
    upper = np.triu(_lee_matrix(), k=1)
    return upper + upper.T + np.eye(upper.shape[0])


def pang_lee_polarity(limit: int | None = None) -> tuple[list[str], list[int]]:
    """Movie-review snippets of ``pang_lee_polarity.cor`` and labels (1 = positive, 0 = negative).

    The text is lower-cased and tokenised (spaces around punctuation), as in the file.
    The file holds 100 negative then 100 positive lines; ``limit`` keeps the first
    ``limit`` lines in that order, so a small limit is all negative.
    """
    sents: list[str] = []
    labels: list[int] = []
    for line in _read_lines("pang_lee_polarity.cor"):
        label, _, text = line.partition(" ")
        if label not in ("__label__pos", "__label__neg"):
            raise ValueError(f"pang_lee_polarity.cor: unexpected label {label!r}")
        sents.append(text.strip())
        labels.append(int(label == "__label__pos"))
    if limit is not None:
        sents, labels = sents[:limit], labels[:limit]
    return sents, labels


def pang_lee_sentences(limit: int | None = None) -> list[str]:
    """The snippets of :func:`pang_lee_polarity` without labels."""
    return pang_lee_polarity(limit)[0]


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits: ``X`` float32 ``(N, 1, 8, 8)`` in ``[0, 1]``, ``y`` int64.

    ``n`` keeps the first ``n`` samples (file order).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "archnet_fx.demo.data.digits needs the 'scikit-learn' package (import name sklearn); "
            "install it with `pip install -c constraints.txt scikit-learn`"
        ) from exc
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    if n is not None:
        x, y = x[:n].clone(), y[:n].clone()
    return x, y
