"""Crash-safe writes and path checks: the one way to write (a hidden temp name beside the target, fsync,
rename, fsync the directory) for files, directories and streamed downloads, and no escape from DATA."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import AltI2VError, UnsafePathError

MD5_RE = re.compile(r"^[0-9a-f]{32}$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff")
# file names worth trying to decode when a folder is listed (content decides in the end)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
TMP_SUFFIX = ".part"
# every temp name this program makes starts with this: a sweep removes those and nothing a user named
TMP_MARKER = ".~alt-i2v-"
OLD_SUFFIX = ".old"  # atomic_dir: the folder replaced, renamed aside (a temp name of <name>.old) for the swap
_TEMP_RE = re.compile(r"^\.~alt-i2v-(\d+)-[0-9a-f]{8}-(.*)\.part(\.[A-Za-z0-9]{1,8})?$", re.S)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str | os.PathLike, *, keep_suffix: bool = False) -> Path:
    """A hidden, unique name beside ``path`` for writing it: ``.~alt-i2v-<pid>-<hex>-<name>.part`` (the
    marker and the writer's pid let :func:`remove_stale_temps` clear what a killed run of this program
    left, and only that). ``keep_suffix`` keeps the extension last (writers such as Keras insist on
    ``.keras``)."""
    path = Path(path)
    tail = path.suffix if keep_suffix else ""
    return path.with_name(f"{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}-{path.name}{TMP_SUFFIX}{tail}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp name :func:`temp_path` made (never a user's own ``*.part`` file)."""
    return bool(_TEMP_RE.match(name))


def _writer_alive(name: str) -> bool:
    """Whether the process that made temp ``name`` still runs here (another command writing now)."""
    m = _TEMP_RE.match(name)
    if m is None:
        return False
    pid = int(m.group(1))
    if pid == os.getpid():  # this process may be writing it on another thread
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def commit(tmp: str | os.PathLike, path: str | os.PathLike, *, sync_dir: bool = True) -> Path:
    """Make a finished temp file durable and rename it over ``path`` (readers see the old file or all of
    the new one, never a part); the rename itself is made durable too, unless ``sync_dir=False`` leaves
    that directory fsync to a caller that batches it."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(Path(path).parent)
    return Path(path)


def discard(path: str | os.PathLike) -> None:
    """Remove a file or folder if it is there; an error removing it is ignored (what is left is a temp
    file that :func:`remove_stale_temps` clears later)."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike, *, keep_suffix: bool = False, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is committed over ``path``
    (:func:`commit`), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, keep_suffix=keep_suffix)
    try:
        yield tmp
        commit(tmp, path, sync_dir=sync_dir)
    finally:
        discard(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary directory beside ``path`` to fill; on success every file in it is made
    durable and the directory replaces ``path`` in one rename (an old one is moved aside first, under a
    temp name of ``<name>.old`` that :func:`stale_temps` finds after a kill, then deleted), on failure it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = temp_path(path.with_name(path.name + OLD_SUFFIX)) if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            discard(old)
    finally:
        discard(tmp)


@contextmanager
def lock_file(path: str | os.PathLike, busy: str, *, shared: bool = False) -> Iterator[None]:
    """Hold an advisory lock on ``path`` (created if missing) for the ``with`` block, or raise
    AltI2VError(``busy``) at once when another process holds it in a conflicting mode. ``shared`` locks
    (readers) coexist; an exclusive one (a writer) excludes all others. The kernel releases it when the
    process dies, so a SIGKILL never leaves a stale lock."""
    from .errors import AltI2VError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            raise AltI2VError(busy) from None
        yield
    finally:
        f.close()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` so that ``path`` holds either the old content or all of the new, never a part."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, *, sync_dir: bool = True) -> Path:
    """Copy ``src`` to ``dst`` with the guarantees of :func:`atomic_path` (all of it or nothing)."""
    with atomic_path(dst, sync_dir=sync_dir) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


class JsonlWriter:
    """Appends whole JSON lines to a file, flushed and (with ``sync``) fsync'ed per call; on open it
    finishes or cuts a last line a crash left (:func:`repair_tail`), so readers see only complete records:
    a crash-safe journal. ``repaired``/``removed_tail``: bytes cut on open, and what they were."""

    def __init__(self, path: str | os.PathLike, *, sync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sync = sync
        self.repaired, self.removed_tail = repair_tail(self.path)
        self._f = open(self.path, "ab")

    def append(self, record: Any) -> None:
        self.append_many([record])

    def append_many(self, records: Any) -> None:
        data = b"".join(_json_line(r) for r in records)
        if not data:
            return
        self._f.write(data)
        self._f.flush()
        if self.sync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_line(record: Any) -> bytes:
    """One JSON line in UTF-8; a string holding bytes that were not UTF-8 (a file name Python keeps as lone
    surrogates) is written with \\u escapes, which read back to the very same string."""
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    try:
        return line.encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def repair_tail(path: str | os.PathLike) -> tuple[int, bytes]:
    """Finish the last line of ``path`` when it has no newline: a line that parses is kept (its newline
    added), one that does not (a write a crash cut short) is cut. Returns (bytes cut, the bytes cut)."""
    import warnings

    path = Path(path)
    if not path.exists():
        return 0, b""
    size = path.stat().st_size
    if size == 0:
        return 0, b""
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0, b""
        pos, chunk = size, 65536
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        else:
            keep = 0
        f.seek(keep)
        tail = f.read()
        if _parses(tail):
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
            cut = b""
        else:
            f.truncate(keep)
            cut = tail
        f.flush()
        os.fsync(f.fileno())
    if cut:
        warnings.warn(f"{path}: removed an unfinished last line ({len(cut)} bytes, {cut[:80]!r}) that an interrupted "
                      "write left", UserWarning, stacklevel=4)
    return len(cut), cut


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return True


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The complete records of a JSON-lines file (a torn last line is ignored); [] when it is missing."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw.split(b"\n")[:-1] if line.strip()]


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_object(path: str | os.PathLike, what: str, *, error: type[AltI2VError] = AltI2VError,
                     hint: str = "") -> dict:
    """A JSON file that must hold an object; a damaged one is ``error`` naming ``what`` it is, followed by
    ``hint`` (what to do about it, e.g. "; rebuild the index")."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = e if not isinstance(e, RecursionError) else "nested too deeply"
        raise error(f"{path}: damaged {what} ({why}){hint}") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: the {what} must be a JSON object{hint}")
    return doc


class NotRegularFile(AltI2VError):
    """A path that is a FIFO, a device, a socket or a directory where a regular file was expected
    (reading it could block forever or never end)."""


def open_regular(path: str | os.PathLike) -> Any:
    """``open(path, "rb")`` of a regular file only (symlinks followed): a FIFO is opened without waiting
    for a writer and refused, as are devices (``/dev/zero`` never ends), sockets and directories."""
    import stat

    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise NotRegularFile(f"{path}: not a regular file (a directory)") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "a directory" if stat.S_ISDIR(mode) else "special"
            raise NotRegularFile(f"{path}: not a regular file ({kind})")
        if hasattr(os, "O_NONBLOCK"):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (symlinks followed) is a regular file: never opens it, so never blocks."""
    import stat

    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = 16 << 20) -> str:
    """Hex digest of a regular file, read in chunks (checksums of images, models and index files); a FIFO
    or a device is a :class:`NotRegularFile` error, never read."""
    import hashlib

    h = hashlib.new(algorithm)
    with open_regular(path) as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def list_image_files(folder: str | os.PathLike, *, recursive: bool = True, exclude: str | os.PathLike | None = None
                     ) -> tuple[list[Path], int]:
    """The image files (by extension) in ``folder``, sub-folders too when ``recursive``, sorted by path;
    hidden files and folders (a leading dot: temporary files, ``.git``) and the folder ``exclude`` left
    out. Also how many other files were seen. The one lister of image folders (import, tag, screen)."""
    root = Path(folder)
    skip = Path(exclude).resolve() if exclude is not None else None
    files, others = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if recursive and not d.startswith(".")
                       and (skip is None or (here / d).resolve() != skip)]
        for name in filenames:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                files.append(here / name)
            else:
                others += 1
    return sorted(files, key=str), others
def stale_temps(folder: str | os.PathLike, target: str) -> list[Path]:
    """Temps :func:`temp_path` made for ``folder/target`` whose writer no longer runs (what a killed write
    of that very file or folder left)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and m.group(2) == target and not _writer_alive(p.name):
            found.append(p)
    return found


def remove_stale_temps(root: str | os.PathLike, *, recursive: bool = True,
                       exclude: Iterable[str | os.PathLike] = ()) -> int:
    """Delete what an interrupted atomic write of this program left under ``root`` (names :func:`temp_path`
    made, files or folders, whose writer no longer runs); returns how many. Nothing else is touched: a
    user's own ``*.part`` file stays, and no folder in ``exclude`` (a source folder inside ``root``) is
    entered. Symlinks are never followed."""
    root = Path(root)
    if not root.is_dir():
        return 0
    skip = {os.path.realpath(p) for p in exclude}
    n = 0
    for top, dirs, files in os.walk(root):
        if os.path.realpath(top) in skip:
            dirs[:] = []
            continue
        found = [d for d in dirs if is_temp_name(d)] + [f for f in files if is_temp_name(f)]
        dirs[:] = [d for d in dirs if not is_temp_name(d) and os.path.realpath(os.path.join(top, d)) not in skip] \
            if recursive else []
        for name in found:
            if _writer_alive(name):
                continue
            p = Path(top) / name
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                n += 1
            except OSError:
                pass
    return n


def printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) shown as ``\\xe9``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_md5(value: Any) -> bool:
    return isinstance(value, str) and bool(MD5_RE.match(value))


def normalize_ext(ext: Any) -> str | None:
    """Lowercase allow-listed image extension without the dot, or None."""
    if not isinstance(ext, str):
        return None
    ext = ext.lower().lstrip(".")
    if ext == "jpeg":
        ext = "jpg"
    if ext == "tif":
        ext = "tiff"
    return ext if ext in IMAGE_EXTS else None


def image_relpath(md5: str, ext: str) -> str:
    """The contract's place for an image: ``images/<md5[:2]>/<md5>.<ext>`` (validated)."""
    norm = normalize_ext(ext)
    if not is_md5(md5) or norm is None:
        raise UnsafePathError(f"refusing image name md5={md5!r} ext={ext!r}: md5 must be 32 hex, ext an image type")
    return f"images/{md5[:2]}/{md5}.{norm}"


def safe_join(root: str | os.PathLike, rel: Any, *, inside: str = "") -> Path:
    """Resolve ``rel`` under ``root/inside`` or raise UnsafePathError (absolute, ``..``, symlink escapes)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UnsafePathError(f"invalid relative path {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise UnsafePathError(f"absolute path {rel!r} not allowed")
    root = Path(root).resolve()
    base = (root / inside).resolve() if inside else root
    target = (root / rel).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"path {rel!r} resolves outside {base}")
    return target
