"""The writing boundary: an output set appears whole, never over an input, never over a stranger's file.

Every set of files graphopt writes together (a model and its external data and reports, a backend's
package, a `--json` ranking) goes through `OutputSet`: the files are written into a staging folder
beside their destination and renamed into place only when all of them are complete; a crash, an
interrupt or SIGTERM (the CLI turns it into an interrupt) leaves the destination as it was and
removes the staging folder. A set refuses to replace any of its `inputs` (compared by resolved path
and by inode, so a hard link or symlink to an input is an input), and, unless `force`, any file in
the folder that graphopt did not write: those are the files a manifest (`.graphopt-manifest.json`,
written last) does not list. Nothing here removes a file it did not create in this run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from graphopt.errors import GraphoptError, UnsafePathError

__all__ = [
    "OutputSet", "MANIFEST", "atomic_write_text", "atomic_write_bytes", "refuse_overwrite", "default_mode",
    "same_file", "read_manifest", "check_manifest", "write_error", "foreign_files",
]

MANIFEST = ".graphopt-manifest.json"
_STAGING_PREFIX = ".graphopt-staging-"


def default_mode() -> int:
    """What open() would give a new file (0o666 minus the umask); temp files start at 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: same resolved path, or the same inode (a hard link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def refuse_overwrite(out_path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise UnsafePathError if writing `out_path` would replace one of the input files."""
    out_path = Path(out_path)
    for source in inputs:
        if source is not None and Path(source).exists() and _would_replace(out_path, source):
            raise UnsafePathError(f"{out_path}: refusing to write over the input '{source}'")


def _would_replace(out_path: Path, source) -> bool:
    if out_path.resolve() == Path(source).resolve():
        return True
    return out_path.exists() and same_file(out_path, source)


def write_error(path: str | os.PathLike, exc: OSError) -> GraphoptError:
    """An OSError met while writing `path` as one line that names the path (disk full says so)."""
    reason = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large for the file system",
              errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
              errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror or str(exc))
    return GraphoptError(f"{path}: cannot write: {reason}")


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of a folder graphopt wrote ({"files": {name: {"bytes", "sha256"}}}), or None."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    return data if isinstance(files, dict) else None


def check_manifest(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Raise GraphoptError unless each of `names` in `folder` is the file the manifest recorded
    (a package whose files come from two different runs is refused before it is used)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for name in names:
        entry = manifest["files"].get(name)
        path = Path(folder) / name
        if entry is None or not path.is_file():
            continue
        if path.stat().st_size != entry.get("bytes") or _sha256(path) != entry.get("sha256"):
            raise GraphoptError(f"{path}: does not match {Path(folder) / MANIFEST} (the folder holds files of two "
                                "different runs); write the package again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class OutputSet:
    """Files that belong together, staged and renamed into `folder` as a set.

        with OutputSet(out_dir, inputs=[model.source], force=False) as out:
            write(out.path("model.onnx"))           # write into the staging folder
            write(out.path("report.md"))

    On success every staged file is renamed into `folder`, then the manifest (when `manifest`);
    on any exception nothing in `folder` changes. Refused, before anything is written: a file of
    the set that would replace one of `inputs`; with `force` False, a folder holding files that no
    graphopt manifest lists (a subfolder counts as graphopt's when it holds a manifest itself).
    """

    def __init__(self, folder: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                 force: bool = False, manifest: bool = True):
        self.folder = Path(folder)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.force = force
        self.manifest = manifest
        self.staging: Path | None = None
        self.written: list[Path] = []

    def path(self, name: str) -> Path:
        """Where to write the file `name` of the set (inside the staging folder)."""
        if self.staging is None:
            raise GraphoptError("OutputSet.path() is only valid inside the `with` block")
        if Path(name).name != name or name in ("", ".", "..", MANIFEST):
            raise UnsafePathError(f"{self.folder}: '{name}' is not a plain file name of an output set")
        refuse_overwrite(self.folder / name, self.inputs)
        return self.staging / name

    def __enter__(self) -> "OutputSet":
        if self.folder.exists() and not self.folder.is_dir():
            raise UnsafePathError(f"{self.folder}: exists and is not a folder")
        if not self.force:
            strangers = foreign_files(self.folder)
            if strangers:
                more = f" and {len(strangers) - 1} more" if len(strangers) > 1 else ""
                raise UnsafePathError(
                    f"{self.folder}: holds files graphopt did not write ('{strangers[0]}'{more}); choose an empty "
                    "or new folder, or pass --force to write beside them (inputs are never overwritten)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=self.folder))
        except OSError as exc:
            raise write_error(self.folder, exc) from exc
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if exc_type is not None and issubclass(exc_type, OSError) and not isinstance(exc, GraphoptError):
            raise write_error(self.folder, exc) from exc  # e.g. the disk filled while a file was written

    def _commit(self) -> None:
        produced = sorted(p for p in self.staging.iterdir() if p.is_file())
        for path in produced:
            refuse_overwrite(self.folder / path.name, self.inputs)
        entries = {}
        try:
            for path in produced:
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(path, default_mode())
                if self.manifest:
                    entries[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            for path in produced:
                os.replace(path, self.folder / path.name)
                self.written.append(self.folder / path.name)
            if self.manifest:
                previous = read_manifest(self.folder) or {"files": {}}
                files = {**{k: v for k, v in previous["files"].items() if (self.folder / k).exists()}, **entries}
                atomic_write_text(self.folder / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))
        except OSError as exc:
            raise write_error(self.folder, exc) from exc


def foreign_files(folder: Path) -> list[str]:
    """Names in `folder` that no graphopt manifest there lists (staging leftovers excepted)."""
    if not folder.is_dir():
        return []
    listed = set((read_manifest(folder) or {"files": {}})["files"])
    strangers = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name == MANIFEST or name.startswith(_STAGING_PREFIX) or name in listed:
            continue
        if entry.is_dir() and not entry.is_symlink() and (entry / MANIFEST).is_file():
            continue
        strangers.append(name)
    return strangers


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file (UTF-8) through a temporary file and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write one file through a temporary file beside it and a rename (for a single file that is
    not part of a set, e.g. a cache entry; user-facing outputs use OutputSet)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _temporary_beside(path) as tmp:
            os.chmod(tmp, default_mode())
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    return path
