"""Writing outputs so that a failed run never leaves a half-written file or loses the previous one."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tasks.errors import UserError

# Every directory a stage produces holds this file: a directory without it (and not empty) was not written by
# Trainflow, and is never deleted or replaced. Its content is fixed, so it never changes a DVC hash.
MARKER = ".trainflow-output"
MARKER_TEXT = "written by Trainflow: this directory is replaced whole when its stage runs again\n"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside `path`; on success rename it over `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def tree_digest(entries) -> str:
    """sha256 of a directory from (relative name, file sha256) pairs, in the order given."""
    h = hashlib.sha256()
    for rel, digest in entries:
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory: over each file's relative name and sha256, in name order."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    return tree_digest((f.relative_to(path).as_posix(), sha256_file(f)) for f in data_files(path))


def data_files(directory: Path) -> list[Path]:
    """The files of a directory, in name order, without Trainflow's marker."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)


def copy_stream(src, dst: str | Path, chunk: int = 1 << 22) -> str:
    """Copy an open binary file to `dst`, hashing it on the way; return its sha256."""
    h = hashlib.sha256()
    with open(dst, "wb") as w:
        while block := src.read(chunk):
            h.update(block)
            w.write(block)
    return h.hexdigest()


def copy_and_hash(src: str | Path, dst: str | Path) -> str:
    """Copy a file or a directory to `dst` reading it once; return what sha256_path(src) returns."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        with open(src, "rb") as r:
            return copy_stream(r, dst)
    dst.mkdir()
    entries = []
    for f in data_files(src):
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        entries.append((rel.as_posix(), copy_and_hash(f, dst / rel)))
    return tree_digest(entries)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def mark(directory: Path) -> None:
    (directory / MARKER).write_text(MARKER_TEXT)


def check_replaceable(dst: Path) -> None:
    """Refuse to replace a directory Trainflow did not write: no marker, not empty, and not a stage output that
    dvc.lock records (outputs written before markers existed, or checked out by DVC)."""
    if dst.is_dir() and not dst.is_symlink() and not (dst / MARKER).exists() and any(dst.iterdir()) and not _recorded_by_dvc(dst):
        example = next(iter(sorted(p for p in dst.rglob("*") if p.is_file())), None)
        raise UserError(
            f"{dst} is a directory Trainflow did not write (it has no {MARKER}; e.g. {example}); it is never "
            "deleted or replaced. Move it away, or point the setting that names it at a path of its own"
        )


def _recorded_by_dvc(path: Path) -> bool:
    import yaml

    lock = Path("dvc.lock")  # stages run from the project root
    if not lock.exists():
        return False
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    path = path.resolve()
    return any(Path(o["path"]).resolve() == path for st in stages.values() for o in (st.get("outs") or []) if "path" in o)


def replace_path(src: str | Path, dst: str | Path) -> None:
    """Put finished file or directory `src` in place of `dst` (a file or a directory); never half-replaced.
    A directory `src` gets the marker; a directory `dst` is replaced only if Trainflow wrote it."""
    src, dst = Path(src), Path(dst)
    check_replaceable(dst)
    if src.is_dir():
        mark(src)
    old = dst.with_name(f".{dst.name}.old")
    remove(old)
    if dst.exists() or dst.is_symlink():
        os.replace(dst, old)
    os.replace(src, dst)
    remove(old)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Put finished directory `src` (made by mkdtemp) in place of `dst`."""
    os.chmod(src, 0o755)  # mkdtemp makes 0700
    replace_path(src, dst)


@contextmanager
def staged_path(path: str | Path):
    """Yield a path that does not exist yet, beside `path`: write a file or a directory there. On success it
    replaces `path` (whichever kind that was); on error it is deleted and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(path)  # before any work
    clear_stale(path)
    holder = Path(tempfile.mkdtemp(prefix=_staging_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield holder / path.name
        replace_path(holder / path.name, path)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty staging directory; on success swap it in for `path`, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(path)  # before any work
    clear_stale(path)
    stage = Path(tempfile.mkdtemp(prefix=_staging_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_dir(stage, path)


def _staging_prefix(path: Path) -> str:
    """Staging names carry the writer's host and pid, so a later run can tell an abandoned one (its process
    gone) from one still being written (on a shared filesystem, only this host's are judged)."""
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def clear_stale(path: Path) -> None:
    """Delete staging files and directories beside `path` left by killed processes of this host."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(socket.gethostname())}-(\d+)\..*\.tmp$")
    for entry in path.parent.glob(f".{path.name}.*.tmp"):
        found = pattern.match(entry.name)
        if found and not _alive(int(found[1])):
            remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
