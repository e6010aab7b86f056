"""The reading boundary: bounded, strictly typed readers for the files users hand graphopt.

Every reader here checks a file's size before reading it, bounds what it trusts (nesting depth,
alias expansion, counts) and raises the GraphoptError subclass its caller names (`error=`) with
the file and the entry in the message; a message that echoes a user's value cuts it to `MAX_ECHO`
characters. The typed field checks (`want_int`, `want_bool`, ...) never coerce: an int field
refuses 8.7, a bool field refuses the string "false".

Confinement (`confined_path`): a path a file names (external data, a shard, a recipe's file
option) must be relative, must not climb with `..`, and must resolve, symlinks followed, to a
regular file inside the folder that holds the naming file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from graphopt.errors import GraphoptError, UnsafePathError

__all__ = [
    "MAX_ECHO", "MAX_JSON_DEPTH", "shown", "capped", "check_file", "read_bytes", "parse_json", "read_json",
    "want_int", "want_bool", "want_number", "want_str", "want_list", "want_dict", "YamlDocument", "read_yaml",
    "confined_path", "usable_path", "read_npz", "read_npy",
]

ErrorType = Callable[[str], GraphoptError]

MAX_ECHO = 80  # characters of a user's value an error message repeats
MAX_MESSAGE = 600  # characters of one error message (a recipe's option echoed by a pass, a long path)
MAX_JSON_DEPTH = 64  # nesting levels; graphopt's own files use at most 6
MAX_YAML_NODES = 20_000  # nodes of a YAML document with every alias expanded (a recipe has a few hundred)


def shown(value: Any, limit: int = MAX_ECHO) -> str:
    """`repr(value)` cut to `limit` characters, so an error line stays one short line."""
    if isinstance(value, (list, tuple, dict)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, int) and value.bit_length() > 256:  # repr of a 5000-digit int raises ValueError
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    if len(text) <= limit:
        return text
    suffix = f"...({len(text):,} characters)"
    return text[:limit - len(suffix)] + suffix


def capped(message: str, limit: int = MAX_MESSAGE) -> str:
    """`message` cut in its middle to `limit` characters (the file name leads, the reason ends it)."""
    if len(message) <= limit:
        return message
    keep = (limit - 30) // 2
    return f"{message[:keep]} ...[{len(message) - 2 * keep:,} characters]... {message[-keep:]}"


# --------------------------------------------------------------------------------- files
def check_file(path: str | os.PathLike, *, max_bytes: int, error: ErrorType, what: str = "file") -> int:
    """The size of `path` after checking it is a regular file of at most `max_bytes` bytes."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a folder, expected a {what}")
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{path}: is not a regular file, expected a {what}")
    if info.st_size > max_bytes:
        raise error(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} a {what} may have")
    return info.st_size


def read_bytes(path: str | os.PathLike, *, max_bytes: int, error: ErrorType, what: str = "file") -> bytes:
    """The bytes of `path`, refused (before reading) when larger than `max_bytes`."""
    check_file(path, max_bytes=max_bytes, error=error, what=what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: more than the {max_bytes:,} bytes a {what} may have")
    return data


# ---------------------------------------------------------------------------------- JSON
class _Duplicate(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    found: dict = {}
    for key, value in pairs:
        if key in found:
            raise _Duplicate(key)
        found[key] = value
    return found


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (iterative: a deep value must not overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(text: str | bytes, *, where: str, error: ErrorType, max_depth: int = MAX_JSON_DEPTH,
               allow_nan: bool = False) -> Any:
    """Parse JSON strictly: no repeated keys, no NaN/Infinity (unless `allow_nan`), at most
    `max_depth` levels of nesting; any problem is `error` naming `where`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_unique_object,
                           parse_constant=None if allow_nan else _refuse_constant)
    except UnicodeDecodeError as exc:
        raise error(f"{where}: not UTF-8 text (byte {exc.start})") from None
    except _Duplicate as exc:
        raise error(f"{where}: key {shown(str(exc.args[0]))} is given twice") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise error(f"{where}: nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # NaN / Infinity, or an integer of more than 4300 digits
        raise error(f"{where}: not valid JSON ({capped(str(exc), MAX_ECHO * 2)})") from None
    if _depth(value, max_depth) > max_depth:
        raise error(f"{where}: nested more than {max_depth} levels deep")
    return value


def read_json(path: str | os.PathLike, *, max_bytes: int, error: ErrorType, what: str = "JSON file",
              max_depth: int = MAX_JSON_DEPTH, allow_nan: bool = False) -> Any:
    """A JSON file read through `parse_json`, its size checked before reading."""
    data = read_bytes(path, max_bytes=max_bytes, error=error, what=what)
    return parse_json(data, where=str(path), error=error, max_depth=max_depth, allow_nan=allow_nan)


# --------------------------------------------------------------------------- typed fields
def want_int(value: Any, where: str, error: ErrorType, *, lo: int | None = None, hi: int | None = None) -> int:
    """`value` as an int: an int, or a float with no fraction (8.0); never a bool, 8.7 or "8"."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise error(f"{where} must be an integer, got {shown(value)}")
    value = int(value)
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise error(f"{where} must be {bounds}, got {shown(value)}")
    return value


def _of_type(value: Any, kind: type, noun: str, where: str, error: ErrorType) -> Any:
    if not isinstance(value, kind):
        raise error(f"{where} must be {noun}, got {shown(value)}")
    return value


def want_bool(value: Any, where: str, error: ErrorType) -> bool:
    """`value` as a bool: only true or false (the string "false" is not false)."""
    return _of_type(value, bool, "true or false", where, error)


def want_number(value: Any, where: str, error: ErrorType, *, finite: bool = True) -> float:
    """`value` as a float: an int or a float (finite unless told), never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise error(f"{where} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise error(f"{where} is too large for a float: {shown(value)}") from None
    if finite and not math.isfinite(number):
        raise error(f"{where} must be a finite number, got {shown(value)}")
    return number


def want_str(value: Any, where: str, error: ErrorType, *, max_len: int = 1 << 16, empty: bool = False) -> str:
    """`value` as a string of at most `max_len` characters (not empty unless told)."""
    _of_type(value, str, "a string", where, error)
    if not value and not empty:
        raise error(f"{where} must not be empty")
    if len(value) > max_len:
        raise error(f"{where} is {len(value):,} characters long, more than {max_len:,}")
    return value


def want_list(value: Any, where: str, error: ErrorType, *, max_len: int | None = None) -> list:
    _of_type(value, list, "a list", where, error)
    if max_len is not None and len(value) > max_len:
        raise error(f"{where} has {len(value):,} items, more than {max_len:,}")
    return value


def want_dict(value: Any, where: str, error: ErrorType) -> dict:
    return _of_type(value, dict, "an object (a mapping)", where, error)


# ---------------------------------------------------------------------------------- YAML
class YamlDocument:
    """One YAML document composed safely: the node tree (so errors can name lines) and `value(node)`.

    Composition is bounded: the text's length is checked by the caller (`read_yaml`, recipes), a
    document whose nodes, every alias expanded, exceed `max_nodes` is refused before anything is
    constructed (a 446-byte alias bomb expands to billions), recursive aliases are refused, and
    reader, scanner, parser, composer and constructor errors (a NUL byte, an unknown `!!python`
    tag) become `error` naming the file and the line.
    """

    def __init__(self, text: str, where: str, error: ErrorType, *, max_nodes: int = MAX_YAML_NODES):
        self.where, self.error = where, error
        self.text = text
        try:
            self.loader = _SafeLoader(text)
        except yaml.YAMLError as exc:  # ReaderError: a NUL or other unprintable character
            raise self._yaml_error(exc) from None
        try:
            self.root = self.loader.get_single_node()
        except yaml.YAMLError as exc:
            self.loader.dispose()
            raise self._yaml_error(exc) from None
        except RecursionError:
            self.loader.dispose()
            raise error(f"{where}: nested too deeply to be a recipe or profile") from None
        if self.root is not None:
            self._check_expansion(max_nodes)

    def _yaml_error(self, exc: yaml.YAMLError) -> GraphoptError:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError):
            char = chr(exc.character) if isinstance(exc.character, int) else exc.character
            line = f", line {self.text.count(chr(10), 0, exc.position) + 1}"
            reason = f"character {char!r} is not allowed in YAML"
        else:
            reason = getattr(exc, "problem", None) or str(exc)
        return self.error(capped(f"{self.where}{line}: not valid YAML: {reason}"))

    def line(self, node: yaml.Node) -> int:
        return node.start_mark.line + 1

    def _check_expansion(self, max_nodes: int) -> None:
        """Count nodes with aliases expanded (each distinct node sized once), refusing cycles."""
        size: dict[int, int] = {}
        stack: list[tuple[yaml.Node, bool]] = [(self.root, False)]
        open_nodes: set[int] = set()
        while stack:
            node, done = stack.pop()
            key = id(node)
            if done:
                open_nodes.discard(key)
                size[key] = 1 + sum(size[id(c)] for c in _children(node))
                if size[key] > max_nodes:
                    raise self.error(f"{self.where}, line {self.line(node)}: the document expands (aliases "
                                     f"repeated) to more than {max_nodes:,} values; refusing it")
                continue
            if key in size:
                continue
            if key in open_nodes:
                raise self.error(f"{self.where}, line {self.line(node)}: an alias refers to the value that holds it")
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node) if id(c) not in size)

    def value(self, node: yaml.Node) -> Any:
        """The Python value of `node` (safe types only); an unknown tag is `error` naming its line."""
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self._yaml_error(exc) from None
        except (RecursionError, ValueError, OverflowError) as exc:  # e.g. a timestamp out of range
            raise self.error(f"{self.where}, line {self.line(node)}: cannot read the value: {shown(str(exc))}") from None

    def close(self) -> None:
        self.loader.dispose()


# libyaml's parser when PyYAML was built with it (ten times faster; same nodes, marks and errors)
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml(path: str | os.PathLike, *, max_bytes: int, error: ErrorType, what: str = "YAML file",
              max_nodes: int = MAX_YAML_NODES) -> Any:
    """A YAML file as plain data (safe types only), its size and expansion bounded."""
    data = read_bytes(path, max_bytes=max_bytes, error=error, what=what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    document = YamlDocument(text, str(path), error, max_nodes=max_nodes)
    try:
        return None if document.root is None else document.value(document.root)
    finally:
        document.close()


# --------------------------------------------------------------------------------- paths
def usable_path(name: Any) -> bool:
    """Whether `name` can name a file at all: a non-empty string without NUL that the file system
    can encode (a lone surrogate from JSON's "\\ud800" cannot)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return True


def confined_path(folder: str | os.PathLike, name: str, *, who: str, error: ErrorType = UnsafePathError,
                  missing: ErrorType | None = None, must_exist: bool = True, label: str = "the folder") -> Path:
    """The file `name` refers to inside `folder`, resolved; refused when it leaves the folder.

    `who` says what names the path ("model.onnx: external data of tensor 'W'"), `label` what the
    folder is ("the model's folder"). Refused: an
    empty or absolute name, a `..` part, a resolved path (symlinks followed) outside `folder`
    (`error`, UnsafePathError by default); with `must_exist`, a name that is missing, a folder or
    not a regular file (`missing`, defaulting to `error`).
    """
    missing = missing or error
    if not usable_path(name):
        raise error(f"{who}: names no usable path ({shown(name)})")
    if os.path.isabs(name) or name.startswith(("\\", "/")) or ".." in Path(name).parts or ".." in name.split("\\"):
        raise error(f"{who}: '{capped(name, MAX_ECHO)}' leaves {label} '{folder}'; only files inside it are read")
    try:
        base = Path(folder).resolve()
        target = (base / name).resolve()
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise missing(f"{who}: '{capped(name, MAX_ECHO)}' cannot be resolved: {shown(str(exc))}") from None
    if base not in target.parents:
        raise error(f"{who}: '{capped(name, MAX_ECHO)}' resolves to '{target}', outside {label} '{base}'")
    if not must_exist:
        return target
    if target.is_dir():
        raise missing(f"{who}: '{capped(name, MAX_ECHO)}' is a folder, not a file")
    if not target.exists():
        raise missing(f"{who}: '{capped(name, MAX_ECHO)}' is missing (looked in '{base}')")
    if not target.is_file():
        raise missing(f"{who}: '{capped(name, MAX_ECHO)}' is not a regular file")
    return target


# ----------------------------------------------------------------------------------- npz
_NPZ_KINDS = "biufc"  # bool, ints, unsigned, floats, complex: no objects, strings or records
NPZ_MAX_RATIO = 64  # savez stores arrays as they are; savez_compressed of real data shrinks them a few times


def read_npz(path: str | os.PathLike, *, max_bytes: int, error: ErrorType, what: str = "arrays file",
             max_arrays: int = 100_000) -> dict[str, np.ndarray]:
    """Arrays of an .npz file by name, each member's header (dtype, shape) checked against its
    stored size and the total against `max_bytes` (and NPZ_MAX_RATIO times the compressed bytes: a
    zip bomb) before any array is read; pickles refused."""
    check_file(path, max_bytes=max_bytes, error=error, what=what)
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > max_arrays:
                raise error(f"{path}: {len(members):,} arrays, more than {max_arrays:,}")
            total = sum(m.file_size for m in members)
            stored = sum(m.compress_size for m in members)
            if total > max_bytes or total > NPZ_MAX_RATIO * stored + (64 << 20):
                raise error(f"{path}: its arrays unpack to {total:,} bytes from {stored:,} stored "
                            f"(at most {max_bytes:,}, and {NPZ_MAX_RATIO}x what is stored past 64 MiB)")
            for member in members:
                name = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
                with archive.open(member) as fh:
                    arrays[name] = _read_npy(fh, member.file_size, f"{path}: array {shown(name)}", error)
    except GraphoptError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError,
            RuntimeError) as exc:  # RuntimeError: an encrypted member
        raise error(f"{path}: not a readable .npz file ({shown(str(exc))})") from None
    return arrays


def read_npy(path: str | os.PathLike, *, max_bytes: int, error: ErrorType, what: str = "array file") -> np.ndarray:
    """The array of an .npy file, its header (dtype, shape) checked against the file's size before
    the data is read; pickles and object or record dtypes refused."""
    size = check_file(path, max_bytes=max_bytes, error=error, what=what)
    try:
        with open(path, "rb") as fh:
            return _read_npy(fh, size, str(path), error)
    except OSError as exc:
        raise error(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def _read_npy(fh, stored: int, where: str, error: ErrorType) -> np.ndarray:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        shape, fortran, dtype = (fmt.read_array_header_1_0(fh) if version == (1, 0) else fmt.read_array_header_2_0(fh))
    except (ValueError, SyntaxError, TypeError) as exc:
        raise error(f"{where}: not a .npy array ({shown(str(exc))})") from None
    if dtype.hasobject or dtype.kind not in _NPZ_KINDS or dtype.fields is not None:
        raise error(f"{where}: dtype {shown(str(dtype))} is not a plain number type (objects are not unpickled)")
    count = math.prod(shape)
    if count * dtype.itemsize > stored:
        raise error(f"{where}: shape {list(shape)} of {dtype} needs {count * dtype.itemsize:,} bytes, "
                    f"the file holds {stored:,}")
    array = np.empty(count, dtype=dtype)
    view, got = memoryview(array.view(np.uint8)), 0
    while got < view.nbytes:
        step = fh.readinto(view[got:])
        if not step:
            raise error(f"{where}: truncated ({got:,} of {view.nbytes:,} bytes)")
        got += step
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
