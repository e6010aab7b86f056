"""Calibration feeds from what users have: sample corpora, text files and folders, JSONL, .npz/.npy
feed files and folders of images, mixed from several sources.

A `CalibrationSpec` (a recipe's `calibration:` section, or `graphopt convert --calibration ...`)
names one or more sources and how many feeds to make; `spec.feeds(model)` reads them through the
bounded readers of `graphopt.files.reading` and returns feeds (input name -> array):

- `sample:pydoc-topics`, `sample:lee-news`: a corpus of `graphopt.frontends.corpora` (its `split`).
- a `.txt` file, or a folder's `.txt` files (read in name order, joined by blank lines), and a
  `.jsonl` file (one JSON object a line; the string in `field`, default "text"): text, tokenized
  with the model's own tokenizer (bytes for the tiny model) into `length`-token windows for a
  causal LM, or into batches of `batch` paragraphs (cut at `length` tokens) for an encoder.
- a `.npz` file (arrays named by the model's inputs) or a `.npy` file (a single-input model): an
  array of the input's rank is cut along axis 0 into feeds of the input's batch size (1 when
  dynamic); one of rank + 1 holds one feed per index of its first axis. Names, dtypes, ranks and
  static dimensions are checked against the model's inputs.
- a folder's images (.png, .jpg, ...; a folder feeds a language model its .txt files, any other
  model its images), read with PIL in name order and preprocessed by an `ImageSpec` (size,
  resize or cover-and-crop, layout, colour order, scale, mean / std, dtype).

Several sources are mixed: a source with `count` gives that many feeds, the others share the rest
of `windows` by `weight`; feeds are interleaved so every prefix of the list mixes the sources. A
source's `skip` passes over its first feeds (a held-out evaluation set reads those a calibration did not).
Every failure is a `CalibrationError` naming the file (and the line, array or image) at fault.
"""

from __future__ import annotations

import fnmatch
import io
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from graphopt.errors import GraphoptError
from graphopt.files.reading import (
    check_file,
    parse_json,
    read_bytes,
    read_npy,
    read_npz,
    read_yaml,
    shown,
    want_dict,
    want_int,
    want_list,
    want_number,
    want_str,
)
from graphopt.frontends import corpora

__all__ = ["CalibrationError", "Source", "ImageSpec", "CalibrationSpec", "parse_source", "parse_image_spec",
           "read_image_spec", "section_option", "command_line_spec", "MAX_FEEDS"]

MAX_FEEDS = 10_000  # feeds one calibration may make (a recipe calibrates on tens)
MAX_TEXT_BYTES = 256 << 20  # one text or JSONL file, and all files of a text folder together
MAX_FEED_BYTES = 4 << 30  # one .npz / .npy feed file
MAX_IMAGE_BYTES = 64 << 20  # one image file
MAX_IMAGE_PIXELS = 64_000_000  # one image, decoded
MAX_FOLDER_FILES = 100_000  # entries of a folder scanned for text or images
MAX_SPEC_BYTES = 1 << 16  # an image preprocessing spec file
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class CalibrationError(GraphoptError):
    """A calibration source is malformed, unreadable or does not fit the model; names the file."""


def _error(message: str) -> CalibrationError:
    return CalibrationError(message)


# --------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes a model input: resized to `size` (height, width; default the input's
    static size), by `resize` "stretch" (to the size exactly) or "cover" (aspect kept, scaled to
    cover the size, then centre-cropped); colours in `colors` order ("RGB", "BGR"; one-channel
    inputs get grey levels); values in [0, 1] (`scale` "unit") or [0, 255] ("byte"), then
    (x - mean) / std per channel; `layout` "NCHW" or "NHWC" (default: from the input's shape);
    `dtype` the input's unless given; `input` the input it feeds (default: the only rank-4 input)."""

    size: tuple[int, int] | None = None
    resize: str = "cover"
    layout: str | None = None
    colors: str = "RGB"
    scale: str = "unit"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    dtype: str | None = None
    input: str | None = None


@dataclass(frozen=True)
class Source:
    """One calibration source: `sample:NAME` or a path; `count` feeds from it (None: a `weight`
    share of the spec's windows); `field` of JSONL objects; `split` of a sample corpus (None: the
    spec's); `skip` feeds (windows, images, entries) passed over first, e.g. those held out;
    `pattern` the file names read from a folder."""

    path: str
    count: int | None = None
    weight: float = 1.0
    field: str = "text"
    split: str | None = None
    skip: int = 0
    pattern: str = "*"  # the names a folder's files must match (fnmatch), e.g. "*.png"
    prompt_tokens: int = 16  # generated: tokens of each prompt
    temperature: float = 1.0  # generated: sampling temperature
    seed: int = 0  # generated: the sampler's seed

    @property
    def is_sample(self) -> bool:
        return self.path.startswith("sample:")

    @property
    def prompts(self) -> "Source | None":
        """For `generated:SOURCE`, SOURCE (where the prompts come from); else None."""
        if not self.path.startswith(_GENERATED):
            return None
        return replace(self, path=self.path[len(_GENERATED):], prompt_tokens=16, temperature=1.0, seed=0)


@dataclass(frozen=True)
class CalibrationSpec:
    """Sources and how many feeds: `windows` in all (token windows, sentence batches, images or
    feed-file entries), `length` tokens a window, `batch` sentences an encoder batch, `split` of
    sample corpora, `image` preprocessing for image folders; `line` is where a recipe declares it."""

    sources: tuple[Source, ...] = ()  # none named: sample:pydoc-topics for language models
    windows: int = 8
    length: int = 128
    split: str = "calib"
    batch: int = 8
    image: ImageSpec | None = None
    line: int = 0

    @property
    def source(self) -> str:
        """The sources as one line ("sample:pydoc-topics", "notes.txt + sample:lee-news")."""
        return " + ".join(s.path for s in self.sources) or f"{_DEFAULT.path} (the default)"

    def overridden(self, sources: list[Source] | None = None, windows: int | None = None, length: int | None = None,
                   image: ImageSpec | None = None) -> "CalibrationSpec":
        """This spec with the command line's choices in place of the recipe's."""
        changes: dict[str, Any] = {}
        if sources:
            changes["sources"] = tuple(sources)
        for key, value in (("windows", windows), ("length", length), ("image", image)):
            if value is not None:
                changes[key] = value
        return replace(self, **changes) if changes else self

    def feeds(self, model) -> list[dict[str, np.ndarray]]:
        """Feeds for `model` from every source, counts allocated and interleaved (see the module)."""
        sources = self.sources
        if not sources and getattr(model, "task", "generic") not in ("causal-lm", "embedding"):
            raise _error(f"calibration names no source, and '{model.name}' is a '{model.task}' model, not a "
                         "language model: give --calibration FOLDER (images) or a .npz / .npy feed file, or "
                         "'source:' in the recipe")
        sources = sources or (_DEFAULT,)
        counts = _allocate(self.windows, sources)
        parts = [_generated_feeds(source, count, self, model) if source.prompts is not None
                 else _source_feeds(source, count + source.skip, self, model)[source.skip:]
                 for source, count in zip(sources, counts) if count]
        return _decoder_prefills(_interleave(parts), model)


def _decoder_prefills(feeds: list[dict[str, np.ndarray]], model) -> list[dict[str, np.ndarray]]:
    """A decoder calibrates on prefills from an empty cache: each token window (a feed of input_ids
    only) becomes the feeds of one; other feeds (a .npz file's, naming every input) stay as given."""
    from graphopt.frontends.decoder import decoder_feeds
    from graphopt.ir.decoder import DecoderSpec

    spec = DecoderSpec.of(model)
    if spec is None:
        return feeds
    longest = max((f["input_ids"].shape[-1] for f in feeds if set(f) == {"input_ids"}), default=0)
    if longest > spec.capacity:
        raise _error(f"calibration: windows of {longest} tokens do not fit the capacity of decoder '{model.name}' "
                     f"({spec.capacity} tokens); lower the window length or build the decoder with a larger capacity")
    return [feed for f in feeds for feed in (decoder_feeds(model, [f["input_ids"]]) if set(f) == {"input_ids"} else [f])]


_DEFAULT = Source("sample:pydoc-topics")
_GENERATED = "generated:"


def _allocate(total: int, sources: tuple[Source, ...]) -> list[int]:
    """Feeds per source: explicit counts, the rest of `total` shared by weight (largest remainder)."""
    fixed = sum(s.count for s in sources if s.count is not None)
    shared = [i for i, s in enumerate(sources) if s.count is None]
    rest = total - fixed
    if shared and rest < len(shared):
        raise _error(f"calibration: {total} windows cannot be shared by {len(shared)} sources after the "
                     f"{fixed} that sources with a count take; raise 'windows'")
    counts = [s.count or 0 for s in sources]
    weights = np.array([sources[i].weight for i in shared], dtype=np.float64)
    if shared:
        exact = weights / weights.sum() * rest
        base = np.maximum(np.floor(exact).astype(int), 1)
        for j in np.argsort(-(exact - np.floor(exact)), kind="stable")[:rest - int(base.sum())]:
            base[j] += 1
        for i, n in zip(shared, base):
            counts[i] = int(n)
    if sum(counts) > MAX_FEEDS:
        raise _error(f"calibration: {sum(counts):,} feeds, more than the {MAX_FEEDS:,} a calibration may make")
    return counts


def _interleave(parts: list[list[dict]]) -> list[dict]:
    """One list from several, each part spread evenly (position (k + 0.5) / len(part))."""
    keyed = [((k + 0.5) / len(part), index, feed) for index, part in enumerate(parts) for k, feed in enumerate(part)]
    return [feed for _, _, feed in sorted(keyed, key=lambda item: item[:2])]


# ------------------------------------------------------------------------------- parsing
_SOURCE_KEYS = ("path", "count", "weight", "field", "split", "skip", "pattern")
_GENERATED_KEYS = ("prompt_tokens", "temperature", "seed")


def parse_source(value: Any, where: str = "source", resolve: Callable[[str], str] | None = None) -> Source:
    """A source from a string ("sample:lee-news", "notes.txt", "generated:sample:pydoc-topics") or a
    mapping with `path` and any of count, weight, field, split, skip, pattern (and, for a generated
    source, prompt_tokens, temperature, seed). `resolve` turns a file path into the one to read (a
    recipe's folder)."""
    if isinstance(value, str):
        value = {"path": value}
    want_dict(value, where, _error)
    generated = isinstance(value.get("path"), str) and value["path"].startswith(_GENERATED)
    keys = _SOURCE_KEYS + (_GENERATED_KEYS if generated else ())
    unknown = sorted(set(value) - set(keys))
    if unknown:
        only = " (prompt_tokens, temperature and seed are for generated: sources)" if unknown[0] in _GENERATED_KEYS else ""
        raise _error(f"{where}: unknown option {shown(unknown[0])} (options: {', '.join(keys)}){only}")
    if "path" not in value:
        raise _error(f"{where}: needs 'path' (a file, a folder, sample:NAME or generated:SOURCE)")
    path = want_str(value["path"], f"{where}: option 'path'", _error, max_len=4096)
    if generated:
        inner = parse_source({**{k: v for k, v in value.items() if k not in _GENERATED_KEYS},
                              "path": path[len(_GENERATED):]}, f"{where}: prompts", resolve)
        if inner.prompts is not None:
            raise _error(f"{where}: option 'path': prompts come from text, not from another generated source")
        return replace(inner, path=_GENERATED + inner.path,
                       prompt_tokens=want_int(value.get("prompt_tokens", 16), f"{where}: option 'prompt_tokens'",
                                              _error, lo=1, hi=4096),
                       temperature=_positive(value.get("temperature", 1.0), f"{where}: option 'temperature'"),
                       seed=want_int(value.get("seed", 0), f"{where}: option 'seed'", _error, lo=0, hi=2**31 - 1))
    if path.startswith("sample:"):
        try:
            corpora.corpus_named(path)
        except GraphoptError as exc:
            raise _error(f"{where}: option 'path': {exc}") from None
    else:
        path = resolve(path) if resolve is not None else path
        if not Path(path).exists():
            raise _error(f"{where}: option 'path': no such file or folder {shown(value['path'])} (a source is a "
                         f"file, a folder, or one of {', '.join('sample:' + name for name in corpora.CORPORA)})")
    count = value.get("count")
    if count is not None:
        count = want_int(count, f"{where}: option 'count'", _error, lo=1, hi=MAX_FEEDS)
    weight = _positive(value.get("weight", 1.0), f"{where}: option 'weight'")
    split = value.get("split")
    if split is not None and split not in ("calib", "eval"):
        raise _error(f"{where}: option 'split' must be 'calib' or 'eval', got {shown(split)}")
    field_name = want_str(value.get("field", "text"), f"{where}: option 'field'", _error, max_len=256)
    skip = want_int(value.get("skip", 0), f"{where}: option 'skip'", _error, lo=0, hi=MAX_FEEDS)
    pattern = want_str(value.get("pattern", "*"), f"{where}: option 'pattern'", _error, max_len=256)
    return Source(path, count, weight, field_name, split, skip, pattern)


def _positive(value: Any, where: str) -> float:
    number = want_number(value, where, _error)
    if number <= 0:
        raise _error(f"{where} must be positive, got {shown(number)}")
    return number


_IMAGE_KEYS = ("size", "resize", "layout", "colors", "scale", "mean", "std", "dtype", "input")
_CHOICES = {"resize": ("stretch", "cover"), "layout": ("NCHW", "NHWC"), "colors": ("RGB", "BGR"),
            "scale": ("unit", "byte"), "dtype": ("float32", "float16", "uint8", "int8")}


def parse_image_spec(value: Any, where: str = "image") -> ImageSpec:
    """An ImageSpec from a mapping of the keys in `_IMAGE_KEYS`, every value checked."""
    want_dict(value, where, _error)
    unknown = sorted(set(value) - set(_IMAGE_KEYS))
    if unknown:
        raise _error(f"{where}: unknown option {shown(unknown[0])} (options: {', '.join(_IMAGE_KEYS)})")
    options: dict[str, Any] = {}
    for key, choices in _CHOICES.items():
        if key in value:
            if value[key] not in choices:
                raise _error(f"{where}: option '{key}' must be one of {', '.join(choices)}, got {shown(value[key])}")
            options[key] = value[key]
    if "size" in value:
        size = want_list(value["size"], f"{where}: option 'size'", _error, max_len=2)
        if len(size) != 2:
            raise _error(f"{where}: option 'size' must be [height, width], got {shown(size)}")
        options["size"] = tuple(want_int(v, f"{where}: option 'size'", _error, lo=1, hi=16384) for v in size)
    for key in ("mean", "std"):
        if key in value:
            numbers = value[key] if isinstance(value[key], list) else [value[key]]
            want_list(numbers, f"{where}: option '{key}'", _error, max_len=4)
            options[key] = tuple(want_number(v, f"{where}: option '{key}'", _error) for v in numbers)
            if not options[key] or key == "std" and min(options[key]) <= 0:
                raise _error(f"{where}: option '{key}' must be 1 to 4 numbers{' > 0' if key == 'std' else ''}, "
                             f"got {shown(value[key])}")
    if "input" in value:
        options["input"] = want_str(value["input"], f"{where}: option 'input'", _error, max_len=1024)
    return ImageSpec(**options)


def read_image_spec(path: str | os.PathLike) -> ImageSpec:
    """An ImageSpec from a YAML (or JSON) file of at most MAX_SPEC_BYTES."""
    data = read_yaml(path, max_bytes=MAX_SPEC_BYTES, error=_error, what="image preprocessing spec")
    return parse_image_spec(data, str(path))


# ------------------------------------------------------------------------------- sources
def _source_feeds(source: Source, count: int, spec: CalibrationSpec, model) -> list[dict[str, np.ndarray]]:
    if source.is_sample:
        return _text_feeds(None, source, count, spec, model)
    path = Path(source.path)
    if not path.exists():  # checked when the source was parsed; it may have gone since
        raise _error(f"{path}: no such calibration file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        kind = _folder_kind(path, source.pattern, model)
        if kind == "images":
            return _image_feeds(path, source.pattern, count, spec.image or ImageSpec(), model)
        return _text_feeds(_folder_text(path, source.pattern), source, count, spec, model)
    if suffix in (".txt", ".text", ".md"):
        return _text_feeds(_text_file(path), source, count, spec, model)
    if suffix == ".jsonl":
        return _text_feeds(_jsonl_text(path, source.field), source, count, spec, model)
    if suffix in (".npz", ".npy"):
        return _array_feeds(path, count, model)
    if suffix in IMAGE_SUFFIXES:
        raise _error(f"{path}: calibration reads images from a folder; name the folder that holds it")
    raise _error(f"{path}: unknown calibration source (expected a .txt, .jsonl, .npz or .npy file, a folder of "
                 ".txt files or images, or sample:NAME)")


def _folder_files(folder: Path, suffixes: tuple[str, ...], pattern: str = "*") -> list[Path]:
    found = []
    with os.scandir(folder) as entries:
        for index, entry in enumerate(entries):
            if index >= MAX_FOLDER_FILES:
                raise _error(f"{folder}: more than {MAX_FOLDER_FILES:,} entries; calibrate from a smaller folder")
            if not entry.name.startswith(".") and Path(entry.name).suffix.lower() in suffixes \
                    and fnmatch.fnmatch(entry.name, pattern):
                found.append(Path(entry.path))
    return sorted(found)


def _folder_kind(folder: Path, pattern: str, model) -> str:
    """What a folder gives `model`: images for a vision model, the .txt files for a language model
    (a folder of images may hold a README.txt; the model decides which files are read)."""
    text = getattr(model, "task", "generic") in ("causal-lm", "embedding")
    suffixes = (".txt",) if text else IMAGE_SUFFIXES
    if not _folder_files(folder, suffixes, pattern):
        other = "images" if text else ".txt files"
        found = " (it holds " + other + ")" if _folder_files(folder, (".txt",) if not text else IMAGE_SUFFIXES,
                                                               pattern) else ""
        raise _error(f"{folder}: holds no {'.txt file' if text else 'image (' + ', '.join(IMAGE_SUFFIXES) + ')'}"
                     + (f" matching {shown(pattern)}" if pattern != "*" else "")
                     + f" for '{model.name}', a '{getattr(model, 'task', 'generic')}' model{found}")
    return "text" if text else "images"


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(f"{where}: not UTF-8 text (byte {exc.start:,})") from None


def _text_file(path: Path) -> str:
    return _decode(read_bytes(path, max_bytes=MAX_TEXT_BYTES, error=_error, what="calibration text file"), str(path))


def _folder_text(folder: Path, pattern: str) -> str:
    texts, total = [], 0
    for path in _folder_files(folder, (".txt",), pattern):
        total += check_file(path, max_bytes=MAX_TEXT_BYTES, error=_error, what="calibration text file")
        if total > MAX_TEXT_BYTES:
            raise _error(f"{folder}: its .txt files hold more than {MAX_TEXT_BYTES:,} bytes (at '{path.name}')")
        texts.append(_text_file(path).strip())
    return "\n\n".join(t for t in texts if t)


def _jsonl_text(path: Path, field_name: str) -> str:
    data = read_bytes(path, max_bytes=MAX_TEXT_BYTES, error=_error, what="JSONL file")
    texts = []
    for number, line in enumerate(_decode(data, str(path)).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        record = want_dict(parse_json(line, where=where, error=_error, max_depth=16), where, _error)
        if field_name not in record:
            raise _error(f"{where}: has no field {shown(field_name)} (fields: {shown(sorted(record))})")
        texts.append(want_str(record[field_name], f"{where}: field {shown(field_name)}", _error,
                              max_len=MAX_TEXT_BYTES, empty=True).strip())
    return "\n\n".join(t for t in texts if t)


def _text_feeds(text: str | None, source: Source, count: int, spec: CalibrationSpec, model) -> list[dict]:
    """Token windows (causal LM) or sentence batches (encoder) of `text`, or of a sample corpus."""
    where = source.path
    task = getattr(model, "task", "generic")
    if task not in ("causal-lm", "embedding"):
        raise _error(f"calibration: source '{where}' is text, but '{model.name}' is a '{task}' model; calibrate "
                     "it from images, a .npz / .npy feed file, or Pipeline.run(calib=...)")
    if task == "causal-lm":
        vocab = model.outputs[0].shape[-1] if model.outputs and model.outputs[0].shape else None
        if model.tokenizer is None and vocab != 256:
            raise _error(f"calibration needs the tokenizer of '{model.name}', which this model does not carry; "
                         "load it as a sample (sample:smollm2) or from its Hugging Face folder")
    elif model.tokenizer is None:
        raise _error(f"calibration needs the tokenizer of '{model.name}'; load it as sample:minilm or from its "
                     "Hugging Face folder")
    split = source.split or spec.split
    try:
        if task == "embedding":
            sentences = corpora.paragraphs(text if text is not None else corpora.text_split(split, source.path))
            return corpora.sentence_batches(model.tokenizer, sentences, count, spec.batch, spec.length)
        if text is None:
            windows = corpora.lm_windows(model.tokenizer, split, count, spec.length, corpus=source.path)
        else:
            windows = corpora.token_windows(_tokens(text, model.tokenizer, count * spec.length), count, spec.length)
    except ValueError as exc:  # more windows than the text holds
        raise _error(f"calibration: {exc} ({where})") from None
    return [{model.inputs[0].name: w} for w in windows]


def _tokens(text: str, tokenizer, needed: int) -> np.ndarray:
    """Token ids of `text` (bytes without a tokenizer), tokenizing a prefix first when it is enough."""
    def encode(part: str) -> np.ndarray:
        if tokenizer is None:
            return np.frombuffer(part.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return np.asarray(tokenizer(part, add_special_tokens=False)["input_ids"], dtype=np.int64)

    prefix = needed * 16  # characters: no tokenizer makes fewer than one token per 16 of them
    if len(text) > prefix:
        ids = encode(text[:prefix])
        if len(ids) >= needed + 1:  # the prefix's last token may be cut: one spare
            return ids[:needed]
    return encode(text)


def _generated_feeds(source: Source, count: int, spec: CalibrationSpec, model) -> list[dict[str, np.ndarray]]:
    """`count` windows of `spec.length` tokens that `model` writes from prompts of `source.prompts`:
    the first `prompt_tokens` tokens of its paragraphs (after `skip` of them), spread evenly over
    them and cycled when fewer than `count`; the rest sampled by `generate_windows`."""
    import torch

    from graphopt.evaluation.lm import logits_function
    from graphopt.training.distillation import generate_windows

    prompts_from = source.prompts
    if getattr(model, "task", "generic") != "causal-lm":
        raise _error(f"calibration: source '{source.path}' is text a causal LM writes; '{model.name}' is a "
                     f"'{getattr(model, 'task', 'generic')}' model")
    if not 0 < source.prompt_tokens < spec.length:
        raise _error(f"calibration: source '{source.path}': prompt_tokens {source.prompt_tokens} must be below the "
                     f"window length {spec.length}")
    prompts = _prompts(_prompt_text(prompts_from, spec, model), model.tokenizer, source.prompt_tokens)[source.skip:]
    if not prompts:
        raise _error(f"calibration: source '{source.path}': no paragraph of {prompts_from.path} (after skipping "
                     f"{source.skip}) has {source.prompt_tokens} tokens to prompt with")
    picked = [prompts[i * len(prompts) // count] for i in range(count)] if len(prompts) > count else prompts
    run, name = logits_function(model), model.inputs[0].name

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(run(ids.numpy())))

    windows = generate_windows(logits, picked, count, length=spec.length, prompt_tokens=source.prompt_tokens,
                               temperature=source.temperature, seed=source.seed, progress=False)
    return [{name: w} for w in windows]


def _prompt_text(source: Source, spec: CalibrationSpec, model) -> str:
    """The text a generated source's prompts come from: a sample corpus split, a text or JSONL file,
    or a folder's .txt files."""
    if source.is_sample:
        return corpora.text_split(source.split or spec.split, source.path)
    path = Path(source.path)
    if path.is_dir():
        _folder_kind(path, source.pattern, model)
        return _folder_text(path, source.pattern)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md"):
        return _text_file(path)
    if suffix == ".jsonl":
        return _jsonl_text(path, source.field)
    raise _error(f"{path}: a generated source takes its prompts from text (sample:NAME, a .txt or .jsonl file, "
                 "a folder of .txt files)")


def _prompts(text: str, tokenizer, length: int) -> list[np.ndarray]:
    """The first `length` tokens of every blank-line separated paragraph of `text` that has as many."""
    heads = (_tokens(p.strip(), tokenizer, length) for p in text.split("\n\n") if p.strip())
    return [h[:length] for h in heads if len(h) >= length]


# --------------------------------------------------------------------------------- arrays
def _array_feeds(path: Path, count: int, model) -> list[dict[str, np.ndarray]]:
    """Feeds from a .npz (arrays named by input) or .npy (one input) file, checked against the inputs."""
    inputs = {spec.name: spec for spec in model.inputs}
    if path.suffix.lower() == ".npz":
        arrays = read_npz(path, max_bytes=MAX_FEED_BYTES, error=_error, what="feed file", max_arrays=1024)
    else:
        if len(inputs) != 1:
            raise _error(f"{path}: a .npy file feeds a single-input model; '{model.name}' has inputs "
                         f"{', '.join(inputs)}: write a .npz with one array per input")
        arrays = {next(iter(inputs)): _read_npy(path)}
    unknown = sorted(set(arrays) - set(inputs))
    missing = sorted(set(inputs) - set(arrays))
    if unknown or missing:
        raise _error(f"{path}: arrays must be named by the model's inputs ({', '.join(inputs)}); "
                     + (f"'{unknown[0]}' is no input" if unknown else f"input '{missing[0]}' has no array"))
    split = {name: _split_feeds(path, name, array, inputs[name]) for name, array in arrays.items()}
    sizes = {name: len(parts) for name, parts in split.items()}
    if len(set(sizes.values())) > 1:
        raise _error(f"{path}: the arrays make different numbers of feeds ({shown(sizes)})")
    available = next(iter(sizes.values()))
    if count > available:
        raise _error(f"{path}: holds {available} feeds, asked for {count}")
    return [{name: parts[i] for name, parts in split.items()} for i in range(count)]


def _read_npy(path: Path) -> np.ndarray:
    return read_npy(path, max_bytes=MAX_FEED_BYTES, error=_error, what="feed file")


def _split_feeds(path: Path, name: str, array: np.ndarray, spec) -> list[np.ndarray]:
    where = f"{path}: array '{name}'"
    if np.dtype(spec.dtype) != array.dtype:
        raise _error(f"{where} is {array.dtype}, input '{name}' takes {spec.dtype}")
    rank = len(spec.shape)
    if array.ndim == rank + 1:
        parts = list(array)
    elif array.ndim == rank and rank > 0:
        first = spec.shape[0]
        step = first if isinstance(first, int) and first > 0 else 1
        if array.shape[0] % step:
            raise _error(f"{where}: {array.shape[0]} rows do not split into batches of {step} (input '{name}')")
        parts = [array[i:i + step] for i in range(0, array.shape[0], step)]
    else:
        raise _error(f"{where} has rank {array.ndim}; input '{name}' has rank {rank} (give rank {rank}, cut along "
                     f"axis 0, or {rank + 1}, one feed per index of axis 0)")
    for axis, (want, got) in enumerate(zip(spec.shape, parts[0].shape if parts else ())):
        if isinstance(want, int) and want > 0 and want != got:
            raise _error(f"{where}: axis {axis} is {got}, input '{name}' needs {want}")
    return [np.ascontiguousarray(p) for p in parts]


# --------------------------------------------------------------------------------- images
def _image_input(model, spec: ImageSpec):
    inputs = [i for i in model.inputs if len(i.shape) == 4]
    if spec.input is not None:
        chosen = [i for i in model.inputs if i.name == spec.input]
        if not chosen:
            raise _error(f"image: input {shown(spec.input)} is not an input of '{model.name}' "
                         f"({', '.join(i.name for i in model.inputs)})")
        inputs = chosen
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise _error(f"calibration: images feed one rank-4 input, '{model.name}' has "
                     f"{', '.join(f'{i.name} {list(i.shape)}' for i in model.inputs)}; name it with the image spec's "
                     "'input' (and feed the others from a .npz)")
    if len(model.inputs) > 1:
        raise _error(f"calibration: '{model.name}' has inputs besides '{inputs[0].name}' that images cannot feed; "
                     "calibrate it from a .npz feed file")
    return inputs[0]


def _image_geometry(spec: ImageSpec, shape: tuple, name: str) -> tuple[str, int, int, int]:
    """(layout, channels, height, width) from the spec and the input's shape."""
    static = [d if isinstance(d, int) and d > 0 else None for d in shape]
    layout = spec.layout or ("NCHW" if static[1] in (1, 3) else "NHWC" if static[3] in (1, 3) else None)
    if layout is None:
        raise _error(f"image: cannot tell the layout of input '{name}' {list(shape)}; give 'layout' (NCHW or NHWC)")
    channels, height, width = (static[1], static[2], static[3]) if layout == "NCHW" else (static[3], static[1], static[2])
    if channels not in (1, 3):
        raise _error(f"image: input '{name}' {list(shape)} has {channels} channels in {layout}; images give 1 or 3")
    if spec.size is not None:
        for axis, want, got in (("height", height, spec.size[0]), ("width", width, spec.size[1])):
            if want is not None and want != got:
                raise _error(f"image: option 'size' gives {axis} {got}, input '{name}' {list(shape)} needs {want}")
        height, width = spec.size
    if height is None or width is None:
        raise _error(f"image: input '{name}' {list(shape)} has a dynamic size; give 'size' [height, width]")
    return layout, channels, height, width


def _load_image(path: Path, channels: int):
    from PIL import Image  # pillow: a dependency of matplotlib, which graphopt requires

    data = read_bytes(path, max_bytes=MAX_IMAGE_BYTES, error=_error, what="image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _error(f"{path}: {image.width} x {image.height} pixels, more than {MAX_IMAGE_PIXELS:,}")
            image.load()
            return image.convert("L" if channels == 1 else "RGB")
    except CalibrationError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise _error(f"{path}: not a readable image ({shown(str(exc))})") from None


def _preprocess(image, spec: ImageSpec, layout: str, height: int, width: int, dtype: np.dtype, path: Path) -> np.ndarray:
    from PIL import Image

    if spec.resize == "stretch":
        image = image.resize((width, height), Image.BILINEAR)
    else:
        k = max(height / image.height, width / image.width)
        w, h = max(width, round(image.width * k)), max(height, round(image.height * k))
        image = image.resize((w, h), Image.BILINEAR)
        left, top = (w - width) // 2, (h - height) // 2
        image = image.crop((left, top, left + width, top + height))
    x = np.asarray(image, dtype=np.float32)
    x = x[..., None] if x.ndim == 2 else x
    if spec.colors == "BGR" and x.shape[-1] == 3:
        x = x[..., ::-1]
    if spec.scale == "unit":
        x = x / 255.0
    channels = x.shape[-1]
    for key, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) not in (1, channels):
            raise _error(f"image: option '{key}' has {len(values)} values for {channels} channels")
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if x.min() < info.min or x.max() > info.max:
            raise _error(f"{path}: preprocessed values span [{x.min():.3g}, {x.max():.3g}], outside {dtype}; "
                         "check the image spec's scale, mean and std")
        x = np.rint(x)
    x = x.transpose(2, 0, 1) if layout == "NCHW" else x
    return np.ascontiguousarray(x[None].astype(dtype))


def _image_feeds(folder: Path, pattern: str, count: int, spec: ImageSpec, model) -> list[dict[str, np.ndarray]]:
    target = _image_input(model, spec)
    layout, channels, height, width = _image_geometry(spec, tuple(target.shape), target.name)
    dtype = np.dtype(spec.dtype or target.dtype)
    files = _folder_files(folder, IMAGE_SUFFIXES, pattern)
    first = target.shape[0]
    batch = first if isinstance(first, int) and first > 0 else 1
    if count * batch > len(files):
        raise _error(f"{folder}: holds {len(files)} images, asked for {count} feeds of {batch}")
    feeds = []
    for i in range(count):
        images = [_preprocess(_load_image(f, channels), spec, layout, height, width, dtype, f)
                  for f in files[i * batch:(i + 1) * batch]]
        feeds.append({target.name: np.concatenate(images)})
    return feeds



# ------------------------------------------------------------------- a recipe's section
_SECTION_KEYS = ("source", "sources", "windows", "length", "split", "batch", "image")


def section_option(key: str, value: Any, resolve: Callable[[str], str] | None = None) -> tuple[str, Any]:
    """One option of a recipe's `calibration:` section, checked: (CalibrationSpec field, value).
    `source` is one source (a string or a mapping), `sources` a list of them; `image` a mapping
    (see `parse_image_spec`); `resolve` maps a source's file path (the recipe's folder)."""
    if key == "source":
        return "sources", (parse_source(value, "option 'source'", resolve),)
    if key == "sources":
        items = want_list(value, "option 'sources'", _error, max_len=64)
        if not items:
            raise _error("option 'sources' must name at least one source")
        return "sources", tuple(parse_source(v, f"option 'sources', item {i + 1}", resolve) for i, v in enumerate(items))
    if key in ("windows", "length", "batch"):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise _error(f"option '{key}' must be a positive integer, got {shown(value)}")
        if key == "windows" and value > MAX_FEEDS:
            raise _error(f"option 'windows' must be at most {MAX_FEEDS:,}, got {value:,}")
        return key, value
    if key == "split":
        if value not in ("calib", "eval"):
            raise _error(f"option 'split' must be 'calib' or 'eval', got {shown(value)}")
        return key, value
    if key == "image":
        return key, parse_image_spec(value, "option 'image'")
    raise _error(f"unknown option {shown(key)} (options: {', '.join(sorted(_SECTION_KEYS))})")


def command_line_spec(spec: CalibrationSpec | None, sources: list[str] | None = None, windows: int | None = None,
                      length: int | None = None, field_name: str | None = None,
                      image_file: str | None = None) -> CalibrationSpec | None:
    """A recipe's calibration with the command line's choices in its place (`--calibration` sources
    relative to the working directory, `--calibration-windows`, `--calibration-length`,
    `--calibration-field` for JSONL, `--calibration-image-spec`); None when neither gives one."""
    given = list(sources or [])
    if spec is None and not given and (windows or length or field_name or image_file):
        raise _error("--calibration-windows / -length / -field / -image-spec need a calibration source: give "
                     "--calibration SOURCE or a recipe with a 'calibration:' section")
    if spec is None and not given:
        return None
    for flag, value in (("--calibration-windows", windows), ("--calibration-length", length)):
        if value is not None and value <= 0:
            raise _error(f"{flag} must be a positive integer, got {value}")
    parsed = [parse_source({"path": s, "field": field_name or "text"}, f"--calibration {s}") for s in given]
    if field_name and not given:
        parsed = [replace(s, field=field_name) for s in spec.sources]
    image = read_image_spec(image_file) if image_file else None
    return (spec or CalibrationSpec()).overridden(parsed or None, windows, length, image)
