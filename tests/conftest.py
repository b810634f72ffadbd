import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/passtest.py: `from passtest import ...`


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``):
    its graphs and least-squares fits are tiny, so threads only contend (6× slower on a busy
    2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bert_tiny():
    """(model, example inputs, captured graph) of the zoo's bert_tiny (needs transformers)."""
    pytest.importorskip("transformers")
    from passtest import captured_zoo
    return captured_zoo("bert_tiny")
