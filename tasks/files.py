"""Writing outputs so that a failed run never leaves a half-written file or loses the previous one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    return tree_digest((f.relative_to(path).as_posix(), sha256_file(f)) for f in sorted(p for p in path.rglob("*") if p.is_file()))


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
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        entries.append((rel.as_posix(), copy_and_hash(f, dst / rel)))
    return tree_digest(entries)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(src: str | Path, dst: str | Path) -> None:
    """Put finished file or directory `src` in place of `dst` (a file or a directory); never half-replaced."""
    src, dst = Path(src), Path(dst)
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
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
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
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_dir(stage, path)
