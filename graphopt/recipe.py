"""YAML recipes: an ordered list of passes, an optional backend and calibration, validated by line.

```yaml
passes:
  - cleanup                     # a bare name: default options
  - quantize: {bits: 8}         # name: {options}
backend: qnn                    # or {name: qnn, <backend options>}
calibration:                    # optional; feeds for passes that calibrate
  source: sample:pydoc-topics   # or a .txt / .jsonl / .npz / .npy file, a folder of .txt or images
  windows: 8                    # number of token windows (or sentence batches, images, feeds)
  length: 128                   # tokens per window
  split: calib                  # calib (default) or eval, of sample corpora
decoder:                        # optional: build a decoder with a KV cache (Llama-family causal LMs; true: defaults)
  attention: ort                # ort (GroupQueryAttention) or portable (standard ops, static cache)
  capacity: 1024                # the longest context, prompt + generated tokens
  prefill_chunk: 128            # tokens per prefill step
```

`sources:` (a list, each a path or {path, count, weight, field, split, skip, pattern}) mixes several; `image:`
preprocesses image folders. graphopt.frontends.calibration reads them (CalibrationSpec); a decoder
calibrates on prefills of its windows from an empty cache, one encodings set for every graph it is saved as.
`decoder:` takes the options of `graphopt.frontends.decoder.DecoderOptions`; `graphopt convert` then
builds the decoder from MODEL and writes a decoder folder (graphs, decoder.json, tokenizer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from graphopt.errors import GraphoptError, RecipeError
from graphopt.files.reading import YamlDocument, capped, confined_path, read_bytes, shown, usable_path
from graphopt.frontends.calibration import CalibrationError, CalibrationSpec, section_option
from graphopt.frontends.decoder import DecoderOptions
from graphopt.pipeline.passes import Pass

__all__ = ["Recipe", "Calibration", "load_recipe", "parse_recipe", "resolve_file_option", "MAX_RECIPE_BYTES"]

_TOP_KEYS = ("passes", "backend", "calibration", "decoder")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred lines
Calibration = CalibrationSpec  # a recipe's calibration section (graphopt.frontends.calibration)


@dataclass
class Recipe:
    """A validated recipe: pass instances in order, the backend (if any) and calibration."""

    passes: list[Pass]
    backend: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)
    calibration: CalibrationSpec | None = None
    decoder: DecoderOptions | None = None
    path: Path | None = None

    def calibration_feeds(self, model) -> list[dict[str, np.ndarray]] | None:
        """Calibration feeds for `model` (input name -> array), or None without a calibration section;
        see `CalibrationSpec.feeds`. Errors are RecipeErrors naming the recipe and the section's line."""
        if self.calibration is None:
            return None
        try:
            return self.calibration.feeds(model)
        except CalibrationError as exc:
            raise RecipeError(f"{self.path}, line {self.calibration.line}: {exc}" if self.path else str(exc)) from exc


# ------------------------------------------------------------------------------------ parsing
def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Reader:
    """Walks the composed YAML tree so every error can name the line it is about.

    `trusted` are files the user named on the command line: file options may point at them
    wherever they are; every other file option must stay inside the recipe's folder."""

    def __init__(self, path: str, document: YamlDocument, trusted: frozenset[Path] = frozenset()):
        self.path = path
        self.document = document
        self.trusted = trusted

    def error(self, node: yaml.Node | None, message: str) -> RecipeError:
        line = f", line {_line(node)}" if node is not None else ""
        return RecipeError(capped(f"{self.path}{line}: {message}"))

    def value(self, node: yaml.Node) -> Any:
        return self.document.value(node)

    def mapping(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) of a mapping, refusing non-mappings and repeated keys."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping (key: value), got {_kind(node)}")
        seen: dict[str, int] = {}
        entries = []
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.error(key_node, f"{what}: keys must be names, got {shown(key)}")
            if key in seen:
                raise self.error(key_node, f"{what}: '{key}' is given twice (first on line {seen[key]})")
            seen[key] = _line(key_node)
            entries.append((key, key_node, value_node))
        return entries


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    return shown(node.value) if node.value != "" else "nothing"


def _option_node(reader: _Reader, options_node: yaml.Node | None, message: str) -> yaml.Node | None:
    """The key node of the option an OptionError names, so the error can point at its line."""
    if not isinstance(options_node, yaml.MappingNode):
        return None
    for key, key_node, _ in reader.mapping(options_node, "options"):
        if f"'{key}'" in message:
            return key_node
    return None


def _build_pass(reader: _Reader, entry: yaml.Node, index: int) -> Pass:
    from graphopt.pipeline import get_pass

    if isinstance(entry, yaml.ScalarNode):
        name, name_node, options_node = reader.value(entry), entry, None
    elif isinstance(entry, yaml.MappingNode) and len(entry.value) == 1:
        ((name, name_node, options_node),) = reader.mapping(entry, f"pass #{index}")
    else:
        raise reader.error(entry, f"pass #{index} must be a name or '{{name: {{options}}}}' with one name, "
                                  f"got {_kind(entry)}")
    if not isinstance(name, str) or not name:
        raise reader.error(name_node, f"pass #{index}: expected a pass name, got {shown(name)}")
    options: dict = {}
    value_nodes: dict[str, yaml.Node] = {}
    if options_node is not None and not (isinstance(options_node, yaml.ScalarNode) and options_node.value in ("", "~", "null")):
        for key, _, value in reader.mapping(options_node, f"pass '{name}' options"):
            options[key], value_nodes[key] = reader.value(value), value
    try:
        cls = get_pass(name)
    except GraphoptError as exc:
        raise reader.error(name_node, str(exc)) from exc
    for option in dataclasses.fields(cls):
        value = options.get(option.name)
        if option.metadata.get("file") and isinstance(value, str) and value:
            where = f"pass '{name}': option '{option.name}'"
            options[option.name] = resolve_file_option(value, reader.path, where, reader.trusted,
                                                       lambda m: reader.error(value_nodes[option.name], m))
    try:
        return cls.from_options(options)
    except GraphoptError as exc:
        raise reader.error(_option_node(reader, options_node, str(exc)) or name_node, str(exc)) from exc
    except TypeError as exc:  # a required option is missing: the dataclass constructor says which
        raise reader.error(name_node, f"pass '{name}': {exc}") from exc


def _check_order(reader: _Reader, passes: list[Pass], entries: list[yaml.Node]) -> None:
    """Refuse an FX-only pass after an ONNX-only one: no model could run it (no ONNX -> FX path)."""
    form = "fx"
    for index, (p, entry) in enumerate(zip(passes, entries)):
        if form == "fx" and "fx" not in p.forms():
            form = "onnx"
        if form not in p.forms():
            before = ", ".join(q.name for q in passes[:index])
            raise reader.error(entry, f"pass '{p.name}' needs the FX form, but the model is ONNX after "
                                      f"{before}; there is no ONNX -> FX path: move '{p.name}' earlier")


def _read_backend(reader: _Reader, node: yaml.Node) -> tuple[str, dict, yaml.Node]:
    if isinstance(node, yaml.ScalarNode):
        name = reader.value(node)
        if not isinstance(name, str) or not name:
            raise reader.error(node, f"backend must be a name or a mapping with 'name', got {shown(name)}")
        return name, {}, node
    entries = reader.mapping(node, "backend")
    values = {key: (key_node, value_node) for key, key_node, value_node in entries}
    if "name" not in values:
        raise reader.error(node, "backend: the mapping needs 'name' (e.g. 'name: qnn')")
    name = reader.value(values["name"][1])
    if not isinstance(name, str):
        raise reader.error(values["name"][1], f"backend: 'name' must be a string, got {shown(name)}")
    options = {key: reader.value(v) for key, (_, v) in values.items() if key != "name"}
    return name, options, values["name"][1]


def _check_backend(reader: _Reader, name: str, options: dict, name_node: yaml.Node, node: yaml.Node) -> None:
    from graphopt.pipeline import available_backends

    backends = available_backends()
    if name not in backends:
        raise reader.error(name_node, f"unknown backend {shown(name)} (known: {', '.join(backends) or 'none'})")
    try:
        backends[name].from_options(options)
    except GraphoptError as exc:
        raise reader.error(_option_node(reader, node, str(exc)) or name_node, str(exc)) from exc
    except TypeError as exc:
        raise reader.error(name_node, f"backend '{name}': {exc}") from exc


def _read_calibration(reader: _Reader, node: yaml.Node, section: yaml.Node) -> CalibrationSpec:
    values: dict[str, Any] = {}
    for key, key_node, value_node in reader.mapping(node, "calibration"):
        resolve = lambda path: resolve_file_option(path, reader.path, "calibration: a source", reader.trusted,  # noqa: E731
                                                   lambda m: reader.error(value_node, m))
        try:
            name, value = section_option(key, reader.value(value_node), resolve)
        except CalibrationError as exc:
            where = key_node if str(exc).startswith("unknown option") else value_node
            raise reader.error(where, f"calibration: {exc}") from exc
        if name in values:
            raise reader.error(key_node, "calibration: give 'source' or 'sources', not both")
        values[name] = value
    return CalibrationSpec(**values, line=_line(section))


def _read_decoder(reader: _Reader, node: yaml.Node) -> DecoderOptions:
    if isinstance(node, yaml.ScalarNode):
        if reader.value(node) is True:  # `decoder: true`: the defaults
            return DecoderOptions()
        raise reader.error(node, f"decoder must be a mapping of options or true, got {_kind(node)}")
    options = {key: reader.value(value) for key, _, value in reader.mapping(node, "decoder")}
    try:
        decoder = DecoderOptions.from_value(options)
    except GraphoptError as exc:
        raise reader.error(_option_node(reader, node, str(exc)) or node, f"decoder: {exc}") from exc
    if decoder.capacity and decoder.prefill_chunk and decoder.prefill_chunk > decoder.capacity:
        raise reader.error(_option_node(reader, node, "'prefill_chunk'"),
                           f"decoder: 'prefill_chunk' ({decoder.prefill_chunk}) is larger than the capacity "
                           f"({decoder.capacity}); a prefill step cannot hold more tokens than the cache")
    return decoder


def resolve_file_option(value: str, recipe: str | Path, where: str, trusted: frozenset[Path] = frozenset(),
                        error=RecipeError) -> str:
    """The path a recipe's file option (sensitivity, encodings, scores, adapters) names, resolved.

    A relative path is read from the recipe's folder, never the working directory. A path that
    leaves that folder (`..`, absolute, a symlink pointing out) is refused, unless it is one of
    `trusted`: files the user named on the command line. Whether the file exists and what it
    holds is its reader's business.
    """
    folder = Path(recipe).parent
    if not usable_path(value):
        raise error(f"{where}: {shown(value)} is not a usable path")
    given = Path(value)
    candidate = (given if given.is_absolute() else folder / given).resolve()
    if candidate in trusted:
        return str(candidate)
    return str(confined_path(folder, value, who=where, must_exist=False, label="the recipe's folder",
                             error=lambda m: error(f"{m}; files outside the recipe's folder are read only when "
                                                   "named on the command line")))


def parse_recipe(text: str, path: str | Path = "<recipe>", *, trusted_files=()) -> Recipe:
    """Validate recipe text; every error is a RecipeError naming `path`, the line and the option.

    File options resolve against `path`'s folder (see `resolve_file_option`); `trusted_files`
    are paths the user gave on the command line, readable wherever they are."""
    trusted = frozenset(Path(f).expanduser().resolve() for f in trusted_files)
    document = YamlDocument(text, str(path), RecipeError)
    reader = _Reader(str(path), document, trusted)
    try:
        root = document.root
        if root is None:
            raise RecipeError(f"{path}: the recipe is empty; it needs a 'passes:' list")
        sections = {key: (key_node, value_node) for key, key_node, value_node in reader.mapping(root, "the recipe")}
        for key, (key_node, _) in sections.items():
            if key not in _TOP_KEYS:
                raise reader.error(key_node, f"unknown section {shown(key)} (sections: {', '.join(_TOP_KEYS)})")
        if "passes" not in sections:
            raise reader.error(root, "the recipe needs a 'passes:' list")
        passes_node = sections["passes"][1]
        if not isinstance(passes_node, yaml.SequenceNode):
            raise reader.error(passes_node, f"'passes' must be a list, got {_kind(passes_node)}")
        passes = [_build_pass(reader, entry, i + 1) for i, entry in enumerate(passes_node.value)]
        _check_order(reader, passes, passes_node.value)
        recipe = Recipe(passes=passes, path=Path(path))
        if "backend" in sections:
            node = sections["backend"][1]
            recipe.backend, recipe.backend_options, name_node = _read_backend(reader, node)
            _check_backend(reader, recipe.backend, recipe.backend_options, name_node, node)
        if "calibration" in sections:
            recipe.calibration = _read_calibration(reader, sections["calibration"][1], sections["calibration"][0])
        if "decoder" in sections:
            recipe.decoder = _read_decoder(reader, sections["decoder"][1])
        return recipe
    finally:
        document.close()


def load_recipe(path: str | Path, *, trusted_files=()) -> Recipe:
    """Read and validate a recipe file (at most MAX_RECIPE_BYTES, UTF-8); see `parse_recipe`."""
    path = Path(path)
    data = read_bytes(path, max_bytes=MAX_RECIPE_BYTES, error=RecipeError, what="recipe file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_recipe(text, path, trusted_files=trusted_files)
