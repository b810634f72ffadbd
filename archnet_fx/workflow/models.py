"""MODEL on the command line: a built-in name, ``package.module:factory`` or a Hugging Face
model directory.

* a **built-in name** (``archnet-fx models``): the demo zoo's model and its example batch;
* ``package.module:factory``: ``factory()`` returns ``(model, example_inputs)`` or a model
  (then give ``--input-shape``). The current directory is importable, as ``python -m`` makes
  it, so ``archnet-fx transform mymodels:tiny ...`` finds ``./mymodels.py``;
* a **local Hugging Face model directory** (a ``config.json`` beside the weights), loaded with
  ``transformers.AutoModel`` and eager attention (the capturable implementation), offline. A
  tokenizer (``tokenizer.json``, ``vocab.txt``, ...) or an image processor
  (``preprocessor_config.json``) found beside it preprocesses ``--calib`` files.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from archnet_fx.errors import ArchnetError, first_line

log = logging.getLogger("archnet_fx.workflow")

#: Files whose presence beside ``config.json`` means a tokenizer can be loaded.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json",)


class UsageError(ArchnetError, ValueError):
    """Bad command-line arguments (model spec, shapes, file arguments)."""


@dataclass
class LoadedModel:
    """A model resolved from MODEL, with what is known about its inputs."""
    model: Any                                 # torch.nn.Module
    example: Any | None                        # example inputs, None: take them from --calib
    name: str
    kind: str                                  # "builtin", "factory" or "hf"
    tokenizer: Any | None = None
    image_processor: Any | None = None
    input_names: list[str] = field(default_factory=list)   # forward's parameter names
    example_is_random: bool = False            # built from --input-shape

    @property
    def modality(self) -> str | None:
        """``"text"``, ``"image"`` or None (tensors only)."""
        if self.tokenizer is not None:
            return "text"
        if self.image_processor is not None:
            return "image"
        return None


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: write dimensions as 1,3,32,32") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: dimensions must be positive integers")
    return dims


def forward_params(model: Any) -> list[str]:
    """Names of ``model.forward``'s positional-or-keyword parameters, in order."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return []
    return [n for n, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def is_hf_dir(spec: str) -> bool:
    return Path(spec).is_dir()


def resolve_model(spec: str, input_shapes: Sequence[str] = (), batch: int = 2) -> LoadedModel:
    """Resolve MODEL (see the module docstring); raises :class:`UsageError` naming the fix."""
    if is_hf_dir(spec):
        return load_hf_dir(spec)
    if ":" not in spec:
        from archnet_fx.demo import zoo

        if spec not in zoo.MODELS:
            hint = (f"; no directory {spec!r} exists either" if ("/" in spec or os.sep in spec)
                    else "")
            raise UsageError(f"unknown model {spec!r}: use one of {', '.join(zoo.list_models())}"
                             f", package.module:factory or a Hugging Face model directory{hint}")
        with quiet_transformers():
            model, ex = zoo.get_model(spec, batch_size=batch)
            tok = zoo.minilm_tokenizer() if spec == "minilm" else None
        return LoadedModel(model, ex, spec, "builtin", tokenizer=tok,
                           input_names=forward_params(model))
    return _load_factory(spec, input_shapes)


@contextlib.contextmanager
def _cwd_importable():
    """The current directory on ``sys.path`` for the import (as ``python -m`` has it)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_factory(spec: str, input_shapes: Sequence[str]) -> LoadedModel:
    import torch

    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise UsageError(f"MODEL {spec!r}: write package.module:factory (e.g. mymodels:tiny)")
    try:
        with _cwd_importable():
            mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"cannot import {mod_name!r} from MODEL {spec!r}: {e} (the current "
                         f"directory {os.getcwd()} and PYTHONPATH are searched)") from e
    factory = getattr(mod, fn_name, None)
    if not callable(factory):
        raise UsageError(f"{mod_name} has no callable {fn_name!r} (MODEL is "
                         "package.module:factory)")
    try:
        with _cwd_importable():          # the factory may import its neighbours too
            made = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: name it, not a traceback
        raise UsageError(f"MODEL {spec}: {fn_name}() raised {type(e).__name__}: "
                         f"{first_line(e)}") from e
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        return LoadedModel(made[0], made[1], spec, "factory",
                           input_names=forward_params(made[0]))
    if isinstance(made, torch.nn.Module):
        ex = None
        if input_shapes:
            g = torch.Generator().manual_seed(0)
            ex = tuple(torch.randn(parse_shape(s), generator=g) for s in input_shapes)
        return LoadedModel(made, ex, spec, "factory", input_names=forward_params(made),
                           example_is_random=bool(input_shapes))
    raise UsageError(f"{spec} returned {type(made).__name__}; expected a torch.nn.Module or "
                     "(model, example_inputs)")


@contextlib.contextmanager
def quiet_transformers():
    """No 'Loading weights' bars and no load-report chatter from transformers, restored after."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf_dir(path: str | Path) -> LoadedModel:
    """A local Hugging Face model directory: ``AutoModel`` (eager attention, offline) and the
    tokenizer or image processor beside it."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise UsageError(f"MODEL {str(path)!r} is a directory without config.json: give a Hugging "
                         "Face model directory (config.json beside the weights), a built-in "
                         "name or package.module:factory")
    if importlib.util.find_spec("transformers") is None:
        raise UsageError(f"MODEL {str(path)!r} is a Hugging Face directory, which needs "
                         "transformers: pip install -c constraints.txt -e '.[hf]'")
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    weights = [p for p in d.iterdir() if p.suffix in (".safetensors", ".bin")
               or p.name.endswith(".safetensors.index.json")]
    if not weights:
        raise UsageError(f"{d}: config.json but no weights (*.safetensors or pytorch_model.bin) "
                         "in the directory")
    with quiet_transformers():
        try:
            model = AutoModel.from_pretrained(str(d), attn_implementation="eager",
                                              local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"{d}: transformers could not load the model: "
                             f"{first_line(e)}") from e
        model.eval()
        tok = proc = None
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            try:
                tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            except (OSError, ValueError) as e:
                log.warning("%s: tokenizer files present but not loadable (%s)", d, e)
        if any((d / f).is_file() for f in IMAGE_PROCESSOR_FILES):
            try:
                proc = AutoImageProcessor.from_pretrained(str(d), local_files_only=True)
            except (OSError, ValueError) as e:
                log.warning("%s: image processor present but not loadable (%s)", d, e)
    return LoadedModel(model, None, str(path).rstrip("/\\") or str(d), "hf", tokenizer=tok, image_processor=proc,
                       input_names=forward_params(model))


def shape_example(loaded: LoadedModel, seq_len: int = 128, batch: int = 1) -> Any:
    """Example inputs for shapes only (inspect, bench) when MODEL came without any: a padded
    placeholder sentence for a tokenizer, a gray image for an image processor."""
    if loaded.example is not None:
        return loaded.example
    if loaded.tokenizer is not None:
        from archnet_fx.workflow.calib import ensure_padding

        ensure_padding(loaded.tokenizer, loaded.name)
        enc = loaded.tokenizer(["an example sentence"] * batch, padding="max_length",
                               truncation=True, max_length=seq_len, return_tensors="pt")
        names = loaded.input_names
        return {k: v for k, v in enc.items() if not names or k in names}
    if loaded.image_processor is not None:
        from PIL import Image

        img = Image.new("RGB", (224, 224), (128, 128, 128))
        return {"pixel_values": loaded.image_processor(images=[img] * batch,
                                                       return_tensors="pt")["pixel_values"]}
    raise UsageError(f"MODEL {loaded.name!r} came without example inputs and has no tokenizer "
                     "or image processor: give --calib FILE or --input-shape")
