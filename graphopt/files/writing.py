"""The writing boundary: files appear whole or not at all, and never over an input."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from graphopt.errors import UnsafePathError

__all__ = ["atomic_write_text", "atomic_write_bytes", "refuse_overwrite", "staged_folder", "default_mode"]


def refuse_overwrite(out_path: Path, inputs: list[Path]) -> None:
    """Raise if writing `out_path` would replace one of the input files."""
    out = out_path.resolve()
    for source in inputs:
        if source is not None and Path(source).exists() and out == Path(source).resolve():
            raise UnsafePathError(f"{out_path}: refusing to write over the input model '{source}'")


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, *, inputs: list[Path] = ()):
    """Yield a temporary folder inside `out_dir`; on success move every file in it into `out_dir`.

    Backends write a set of files that belong together; staging them keeps a crash from leaving
    half a package, and the final renames refuse to replace any of `inputs`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=out_dir))
    try:
        yield staging
        produced = sorted(p for p in staging.iterdir() if p.is_file())
        for path in produced:
            refuse_overwrite(out_dir / path.name, list(inputs))
        for path in produced:
            os.chmod(path, default_mode())
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_mode() -> int:
    """What open() would give a new file (0o666 minus the umask); temp files start at 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (UTF-8) through a temporary file and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


