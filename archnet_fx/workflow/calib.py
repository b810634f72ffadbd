"""Unlabeled calibration data from files (``archnet-fx transform --calib PATH``).

One or more paths, all of one form:

* a **text file** (any other suffix; UTF-8, one sample per line, blank lines skipped),
  tokenized with the model directory's tokenizer at ``seq_len`` (padded to it, truncated
  beyond it; the attention mask and token types as the model's ``forward`` takes them);
* a **folder of images** (``.png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm``, sorted by
  name), preprocessed by the model directory's image processor, or resized to
  ``image_size`` × ``image_size`` and normalised with ``mean``/``std`` (per channel; one value
  means grayscale, three RGB);
* **tensors**: ``.npy`` (one array: the model's one input, samples along axis 0), ``.npz``
  (arrays named after ``forward``'s parameters, e.g. ``input_ids``/``attention_mask``, passed
  by keyword; or ``arr_0``, ``arr_1``, ... passed by position) or ``.pt`` (a tensor, a list or
  tuple of tensors, or a dict of named tensors). ``.pt`` files are loaded with
  ``torch.load(..., weights_only=True)``: a file from someone else is never unpickled into
  arbitrary objects; one that needs that is refused.

Every problem (an empty or undecodable file, an unreadable image, arrays of different lengths
or of the wrong shape, non-finite values) raises :class:`~archnet_fx.errors.CalibrationError`
naming the file and the line, image or array, before any expensive work.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from archnet_fx.errors import CalibrationError, first_line

log = logging.getLogger("archnet_fx.workflow")

IMAGE_SUFFIXES = frozenset(".png .jpg .jpeg .bmp .gif .tif .tiff .webp .ppm .pgm".split())
TENSOR_SUFFIXES = frozenset((".npy", ".npz", ".pt", ".pth"))


@dataclass
class CalibData:
    """Calibration batches read from files, and where they came from."""
    batches: list[Any]        # each a tuple of tensors (positional) or a dict (keyword)
    samples: int
    form: str                 # "text", "images" or "tensors"
    sources: list[str]

    def describe(self) -> str:
        what = {"text": "text file", "images": "image folder", "tensors": "tensor file"}.get(
            self.form, self.form)
        return (f"{self.samples} samples from {len(self.sources)} {what}(s) "
                f"({', '.join(self.sources[:3])}{', ...' if len(self.sources) > 3 else ''}), "
                f"{len(self.batches)} batches")


def form_of(path: Path) -> str:
    if path.is_dir():
        return "images"
    if path.suffix.lower() in TENSOR_SUFFIXES:
        return "tensors"
    return "text"


def check_paths(paths: Sequence[str | Path]) -> str:
    """The cheap checks, before any model is loaded: every path exists, one form for all;
    returns the form."""
    ps = [Path(p) for p in paths]
    for p in ps:
        if not p.exists():
            raise CalibrationError(f"--calib {p}: no such file or directory")
    forms = {form_of(p) for p in ps}
    if len(forms) > 1:
        raise CalibrationError(f"--calib paths mix forms ({', '.join(sorted(forms))}): give one "
                               "form per run (text files, image folders or tensor files)")
    return forms.pop()


def load_calibration(paths: Sequence[str | Path], loaded: Any, *, seq_len: int = 128,
                     batch_size: int = 16, limit: int | None = None,
                     image_size: int | None = None, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> CalibData:
    """Read ``paths`` for ``loaded`` (a :class:`~archnet_fx.workflow.models.LoadedModel`) into
    batches of ``batch_size`` samples (the first ``limit`` samples when given)."""
    if not paths:
        raise CalibrationError("no --calib path given")
    if batch_size < 1:
        raise CalibrationError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise CalibrationError(f"--limit must be >= 1, got {limit}")
    ps = [Path(p) for p in paths]
    form = check_paths(ps)
    parts: list[Any] = []
    for p in ps:
        if form == "text":
            parts.append(_text(p, loaded, seq_len))
        elif form == "images":
            parts.append(_images(p, loaded, image_size, mean, std))
        else:
            parts.append(_tensors(p, loaded))
    samples = _concat(parts, ps)
    n = _rows(samples)
    if limit is not None and limit < n:
        samples = _take(samples, 0, limit)
        n = limit
    batches = [_take(samples, i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    return CalibData(batches, n, form, [str(p) for p in ps])


# --------------------------------------------------------------------------- text


def ensure_padding(tok: Any, name: str) -> None:
    """Padding to a fixed length needs a pad token; decoder tokenizers (GPT-2, Llama) ship
    without one: their end-of-sequence token pads (the attention mask hides it), as is usual."""
    if getattr(tok, "pad_token", None) is not None:
        return
    if getattr(tok, "eos_token", None) is None:
        raise CalibrationError(f"the tokenizer of {name!r} has neither a pad nor an "
                               "end-of-sequence token, so text cannot be padded to --seq-len; "
                               "tokenize yourself and pass an .npz of input_ids/attention_mask")
    tok.pad_token = tok.eos_token


def _text(path: Path, loaded: Any, seq_len: int) -> Any:
    tok = getattr(loaded, "tokenizer", None)
    if tok is None:
        raise CalibrationError(
            f"--calib {path}: a text file needs a tokenizer, and MODEL {loaded.name!r} has none "
            "(give a Hugging Face model directory with its tokenizer files, or tokenize "
            "yourself and pass an .npz of input_ids/attention_mask)")
    if not path.is_file():
        raise CalibrationError(f"--calib {path}: not a readable file")
    raw = path.read_bytes()
    lines = []
    for i, b in enumerate(raw.split(b"\n"), 1):
        try:
            s = b.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise CalibrationError(f"--calib {path}, line {i}: not UTF-8 text ({e.reason} at "
                                   f"byte {e.start}); is this a binary file? Tensors go in "
                                   ".npy/.npz/.pt files") from None
        if "\x00" in s:
            raise CalibrationError(f"--calib {path}, line {i}: contains NUL bytes; is this a "
                                   "binary file? Tensors go in .npy/.npz/.pt files")
        if s:
            lines.append(s)
    if not lines:
        raise CalibrationError(f"--calib {path}: no text (the file is empty or blank); give one "
                               "sample per line")
    ensure_padding(tok, loaded.name)
    try:
        enc = tok(lines, padding="max_length", truncation=True, max_length=seq_len,
                  return_tensors="pt")
    except (ValueError, TypeError) as e:
        raise CalibrationError(f"--calib {path}: the tokenizer refused the text: "
                               f"{first_line(e)}") from None
    names = list(getattr(loaded, "input_names", []) or [])
    out = {k: v for k, v in enc.items() if not names or k in names}
    if not out:
        raise CalibrationError(f"--calib {path}: the tokenizer gives {', '.join(enc)} but the "
                               f"model takes {', '.join(names)}")
    return out


# --------------------------------------------------------------------------- images


def _images(folder: Path, loaded: Any, image_size: int | None, mean: Sequence[float] | None,
            std: Sequence[float] | None) -> Any:
    import numpy as np
    import torch

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise CalibrationError("image calibration needs Pillow: pip install pillow") from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"--calib {folder}: no images (looked for "
                               f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    proc = getattr(loaded, "image_processor", None)
    if image_size is None and proc is None:
        raise CalibrationError(f"--calib {folder}: MODEL {loaded.name!r} has no image processor; "
                               "give --image-size (and --mean/--std, default 0.5 per channel)")
    mean = list(mean) if mean is not None else None
    std = list(std) if std is not None else None
    channels = len(mean) if mean is not None else (len(std) if std is not None else 3)
    if channels not in (1, 3) or (mean is not None and std is not None and len(mean) != len(std)):
        raise CalibrationError("--mean/--std: give 1 value (grayscale) or 3 (RGB), the same "
                               "number for both")
    if std is not None and any(s <= 0 for s in std):
        raise CalibrationError(f"--std must be positive, got {std}")
    imgs = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                imgs.append(im.convert("L" if channels == 1 else "RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise CalibrationError(f"--calib {folder}: image {f.name} is unreadable ({e})") from None
    if proc is not None and image_size is None:
        try:
            x = proc(images=imgs, return_tensors="pt")["pixel_values"]
        except Exception as e:  # noqa: BLE001 - the processor's own complaint, with the file
            raise CalibrationError(f"--calib {folder}: the model's image processor failed: "
                                   f"{e}") from e
    else:
        m = torch.tensor(mean if mean is not None else [0.5] * channels).view(-1, 1, 1)
        s = torch.tensor(std if std is not None else [0.5] * channels).view(-1, 1, 1)
        arrs = [np.asarray(im.resize((image_size, image_size), Image.BILINEAR), np.float32)
                for im in imgs]
        x = torch.from_numpy(np.stack(arrs)) / 255.0
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        x = ((x - m) / s).contiguous()
    names = list(getattr(loaded, "input_names", []) or [])
    if getattr(loaded, "kind", None) == "hf" and "pixel_values" in names:
        return {"pixel_values": x}
    return _check_like_example((x,), loaded, folder, "images")


# --------------------------------------------------------------------------- tensors


def _tensors(path: Path, loaded: Any) -> Any:
    import numpy as np
    import torch

    suffix = path.suffix.lower()
    named: dict[str, Any] | None = None
    listed: list[Any] | None = None
    try:
        if suffix == ".npy":
            listed = [np.load(path, allow_pickle=False)]
        elif suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as z:
                    named = {k: z[k] for k in z.files}
            except zipfile.BadZipFile as e:
                raise CalibrationError(f"--calib {path}: not a readable .npz file ({e})") from None
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - pickle refusals come in several types
                raise CalibrationError(
                    f"--calib {path}: not loadable with torch.load(weights_only=True) "
                    f"({first_line(e)[:200]}); save plain tensors (a tensor, a list "
                    "or a dict of tensors) — arbitrary pickled objects are never loaded") from None
            if isinstance(obj, torch.Tensor):
                listed = [obj]
            elif isinstance(obj, (list, tuple)):
                listed = list(obj)
            elif isinstance(obj, dict):
                bad = [k for k in obj if not isinstance(k, str)]
                if bad:
                    raise CalibrationError(f"--calib {path}: a dict with key {bad[0]!r}; name "
                                           "the tensors after the model's forward parameters")
                named = dict(obj)
            else:
                raise CalibrationError(f"--calib {path}: holds a {type(obj).__name__}; save a "
                                       "tensor, a list/tuple or a dict of tensors")
    except CalibrationError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise CalibrationError(f"--calib {path}: not a readable {suffix} file ({e})") from None
    if named is not None and not named:
        raise CalibrationError(f"--calib {path}: holds no arrays")
    if listed is not None and not listed:
        raise CalibrationError(f"--calib {path}: holds no tensors")

    def as_tensor(name: str, a: Any) -> torch.Tensor:
        if isinstance(a, np.ndarray):
            if a.dtype.kind not in "biuf":
                raise CalibrationError(f"--calib {path}: {name} holds {a.dtype} values; give "
                                       "numbers (bool, integer or float arrays)")
            if a.dtype.kind == "u" and a.dtype.itemsize > 1:
                a = a.astype(np.int64)       # torch has no wide unsigned types
        t = a if isinstance(a, torch.Tensor) else (
            torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else None)
        if t is None:
            raise CalibrationError(f"--calib {path}: {name} is a {type(a).__name__}, not an "
                                   "array")
        if t.dtype == torch.float64:
            t = t.float()
        if not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.int16,
                                                     torch.int8, torch.uint8, torch.bool)):
            raise CalibrationError(f"--calib {path}: {name} has dtype {t.dtype}; give numbers")
        if t.dim() == 0 or t.shape[0] == 0:
            raise CalibrationError(f"--calib {path}: {name} has shape {tuple(t.shape)}: samples "
                                   "go along the first axis, and there must be at least one")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero()[0])
            raise CalibrationError(f"--calib {path}: {name} has a NaN or infinite value in "
                                   f"sample {bad}")
        return t

    names = list(getattr(loaded, "input_names", []) or [])
    if named is not None:
        positional = all(k.startswith("arr_") and k[4:].isdigit() for k in named)
        if positional:
            listed = [named[f"arr_{i}"] for i in range(len(named)) if f"arr_{i}" in named]
            if len(listed) != len(named):
                raise CalibrationError(f"--calib {path}: arrays {', '.join(named)} are not "
                                       "arr_0, arr_1, ... in sequence")
        elif len(named) == 1 and names and next(iter(named)) not in names:
            listed = list(named.values())     # one unnamed-looking array: the one input
        else:
            unknown = [k for k in named if names and k not in names]
            if unknown:
                raise CalibrationError(
                    f"--calib {path}: array(s) {', '.join(unknown)} match no parameter of the "
                    f"model's forward ({', '.join(names) or 'unknown'}); name arrays after the "
                    "parameters (passed by keyword) or save them as arr_0, arr_1, ...")
            out = {k: as_tensor(f"array {k!r}", v) for k, v in named.items()}
            _same_rows(out, path)
            return _check_like_example(out, loaded, path, "tensors")
    tensors = tuple(as_tensor(f"tensor {i}", a) for i, a in enumerate(listed or []))
    _same_rows(tensors, path)
    return _check_like_example(tensors, loaded, path, "tensors")


def _same_rows(sample: Any, path: Path) -> None:
    items = sample.items() if isinstance(sample, dict) else enumerate(sample)
    rows = {str(k): int(t.shape[0]) for k, t in items}
    if len(set(rows.values())) > 1:
        raise CalibrationError(f"--calib {path}: arrays have different numbers of samples "
                               f"({', '.join(f'{k}: {v}' for k, v in rows.items())})")


def _check_like_example(sample: Any, loaded: Any, path: Path, form: str) -> Any:
    """Compare against the model's example inputs (when it has some): same inputs, same
    per-sample shape (sequence lengths may differ for integer token inputs)."""
    import torch

    ex = getattr(loaded, "example", None)
    if ex is None:
        return sample
    if isinstance(ex, torch.Tensor):
        ex = (ex,)
    if isinstance(sample, dict) != isinstance(ex, dict):
        if isinstance(ex, dict) and isinstance(sample, tuple) and len(sample) == len(ex):
            sample = dict(zip(ex, sample))        # positional arrays for a keyword model
        elif isinstance(ex, (tuple, list)) and isinstance(sample, dict):
            return sample                         # keywords: forward checks them by name
        else:
            return sample
    pairs = (((k, sample[k], ex.get(k)) for k in sample) if isinstance(sample, dict)
             else ((i, t, ex[i] if i < len(ex) else None) for i, t in enumerate(sample)))
    if isinstance(sample, tuple) and len(sample) != len(ex):
        raise CalibrationError(f"--calib {path}: {len(sample)} {form} input(s) but the model's "
                               f"example has {len(ex)}")
    for k, t, e in pairs:
        if not isinstance(e, torch.Tensor):
            continue
        want, got = tuple(e.shape[1:]), tuple(t.shape[1:])
        token_like = not e.is_floating_point() and e.dim() == t.dim() == 2
        if got != want and not token_like:
            raise CalibrationError(
                f"--calib {path}: input {k} has per-sample shape {got}, the model's example "
                f"{want} (samples go along the first axis: expected (N, "
                f"{', '.join(map(str, want))}))")
        if e.is_floating_point() != t.is_floating_point():
            raise CalibrationError(f"--calib {path}: input {k} is {t.dtype}, the model's example "
                                   f"{e.dtype}")
    return sample


# --------------------------------------------------------------------------- batching


def _rows(sample: Any) -> int:
    first = next(iter(sample.values())) if isinstance(sample, dict) else sample[0]
    return int(first.shape[0])


def _take(sample: Any, a: int, b: int) -> Any:
    if isinstance(sample, dict):
        return {k: v[a:b] for k, v in sample.items()}
    return tuple(v[a:b] for v in sample)


def _concat(parts: list[Any], paths: list[Path]) -> Any:
    import torch

    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p, path in zip(parts[1:], paths[1:]):
        same = (set(p) == set(first)) if isinstance(first, dict) and isinstance(p, dict) else (
            isinstance(p, tuple) and isinstance(first, tuple) and len(p) == len(first))
        keys = list(first) if isinstance(first, dict) else range(len(first))
        if not same or any(tuple(p[k].shape[1:]) != tuple(first[k].shape[1:]) for k in keys):
            raise CalibrationError(f"--calib {path}: its inputs differ from {paths[0]}'s in names "
                                   "or per-sample shape; every --calib file must hold the same "
                                   "inputs")
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
