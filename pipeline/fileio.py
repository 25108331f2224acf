"""Writing files in folders that others may have filled: never through a link.

Every file the tools create goes through this module, because the folders they
write into (make_records' OUT, orient's DST, a model folder) may hold entries
planted by someone else: a link named like the file the tool is about to write
would otherwise redirect the write (or a removal) to any file or folder the
user can reach. The rules, as coreutils `rm`/`cp` and `tar` keep them:

  * A file is created with O_CREAT | O_EXCL | O_NOFOLLOW: it is new, never an
    existing file or the target of a link.
  * A file is replaced by writing a temporary file in the same folder and
    renaming it over the name: rename replaces a planted link itself, it never
    writes through it. Temporary names carry 64 random bits (secrets, what
    `tempfile` does, but relative to a folder descriptor, which `tempfile`
    cannot take): a name planted in advance is never the one used.
  * Subfolders inside a named output folder are opened one component at a time
    with O_NOFOLLOW | O_DIRECTORY relative to the parent's descriptor
    (`open_dirs`), so a link among them is refused, not followed.
  * Removal never descends through a link: a link is unlinked (`rm -rf` does
    the same); real folders are removed with shutil.rmtree, whose Linux
    implementation works on descriptors and does not follow links inside.
  * durable: the file's bytes are fsynced before the rename and the folder after
    it, so a power cut leaves the old file or the new one.

Refusals are `UnsafePathError`, an OSError (errno ELOOP) whose message says
what was found, so the tools' existing "cannot write into ..." handling prints
it as one line.

The user's own path (the folder named on the command line, its parents) is
trusted and followed as given; only what lies inside it is not.
"""
import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import warnings

_CREATE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(OSError):
    """A link (or other non-regular entry) where a tool writes its own file or folder."""


def refusal(path, found: str = "a symbolic link") -> UnsafePathError:
    """The error for `found` at `path`: one line, ELOOP, path as filename."""
    return UnsafePathError(
        errno.ELOOP, f"{found} is where this tool writes its own entry; "
                     "refusing to write through it (remove it and run again)",
        os.fsdecode(path))


# ---------------------------------------------------------------- folders

def open_dir(path) -> int:
    """Descriptor of an existing folder the user named (links in `path` followed:
    the command line is trusted). Close it with os.close."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def open_subdir(dir_fd: int, name, *, create: bool = True) -> int:
    """Descriptor of folder `name` (one component) inside dir_fd, created if
    missing (and create). A link or a non-folder there is refused."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=dir_fd)
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if _is_link(name, dir_fd) else "a file"
            raise refusal(name, kind) from None
        raise


def open_dirs(root, rel="", *, create: bool = True) -> int:
    """Descriptor of root/rel: root is the named (trusted) folder, created with
    its parents if missing; every component of rel is opened with
    O_NOFOLLOW | O_DIRECTORY relative to its parent, so a link planted inside
    root is refused (UnsafePathError) instead of followed."""
    if create:
        os.makedirs(root, exist_ok=True)
    fd = open_dir(root)
    try:
        rel = os.fspath(rel)
        sep, dot, dotdot = (b"/", b".", b"..") if isinstance(rel, bytes) else ("/", ".", "..")
        for part in rel.split(sep):
            if part in (sep[:0], dot):
                continue
            if part == dotdot:
                raise UnsafePathError(errno.EINVAL, "'..' in a relative output path",
                                      os.fsdecode(rel))
            child = open_subdir(fd, part, create=create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dirs(root, rel) -> str:
    """root/rel created (see open_dirs: links inside root refused); returns its path."""
    os.close(open_dirs(root, rel))
    return os.path.join(root, rel)


def _is_link(name, dir_fd=None) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _split(path, dir_fd):
    """(folder descriptor, name, owned): path's folder opened unless dir_fd given."""
    if dir_fd is not None:
        return dir_fd, path, False
    folder, name = os.path.split(os.path.abspath(path))
    return open_dir(folder), name, True


# ---------------------------------------------------------------- files

def create_file(path, *, dir_fd: int = None, replace: bool = False,
                readable: bool = False) -> int:
    """A new regular file; returns its descriptor (O_WRONLY, or O_RDWR if readable).

    Never opens an existing entry: with replace, whatever is at the name (a file
    or a link; never a folder) is unlinked first, a link itself, never its target.
    A name that reappears in between raises FileExistsError.
    """
    flags = _CREATE | (os.O_RDWR if readable else os.O_WRONLY)
    if replace:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(path, dir_fd=dir_fd).st_mode):
                os.unlink(path, dir_fd=dir_fd)
    return os.open(path, flags, 0o666, dir_fd=dir_fd)


def open_append(path, *, dir_fd: int = None):
    """Text file object appending to `path` (created if missing); a link or a
    non-regular file there is refused (UnsafePathError)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refusal(path) from None
        if e.errno == errno.ENXIO:     # a FIFO without a reader (O_NONBLOCK)
            raise refusal(path, "a special file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise refusal(path, "a special file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8")


def _temp_name(name) -> str:
    """A hidden, unguessable name beside `name`, short enough for a 255-byte
    limit whatever name's length: '.<first 32 chars>.<16 hex>.tmp'."""
    base = os.fsdecode(name)[:32]
    return f".{base}.{secrets.token_hex(8)}.tmp"


def _new_temp(dir_fd, name, suffix=""):
    """(descriptor, name) of a new temporary file in dir_fd (O_EXCL: retried
    on the astronomically unlikely clash)."""
    for _ in range(100):
        tmp = _temp_name(name) + suffix
        try:
            return os.open(tmp, _CREATE | os.O_WRONLY, 0o666, dir_fd=dir_fd), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.fsdecode(name))


@contextlib.contextmanager
def atomic_write(path, mode: str = "w", *, dir_fd: int = None, durable: bool = True,
                 encoding: str = None, newline: str = None):
    """`with atomic_write(path) as f: f.write(...)` replaces path in one step.

    The file object writes a new temporary file beside path (see module doc);
    when the block ends without error it is fsynced (durable), renamed over
    path (a link there is replaced, never written through) and the folder
    fsynced. On error the temporary file is removed and path is untouched.
    mode: "w" (text, encoding defaults to UTF-8) or "wb".
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    folder, name, owned = _split(path, dir_fd)
    try:
        fd, tmp = _new_temp(folder, name)
        try:
            if mode == "w":
                f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
            else:
                f = os.fdopen(fd, "wb")
            with f:
                yield f
                f.flush()
                if durable:
                    os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            raise
        _rename(tmp, name, folder, durable=durable, shown=path)
    finally:
        if owned:
            os.close(folder)


@contextlib.contextmanager
def replacing(path, *, suffix: str = "", durable: bool = True):
    """For writers that take only a path (Keras, h5py, PIL by suffix):

        with replacing(path, suffix=".keras") as tmp:
            model.save(tmp)

    tmp is a new empty file (O_EXCL | O_NOFOLLOW, unguessable name ending in
    suffix) beside path; after the block it is renamed over path as in
    durable_replace; on error it is removed. The writer opens tmp by name, so a
    process racing inside the folder could still swap it in that moment; a
    link planted before the run cannot be used.
    """
    folder, name = os.path.split(os.path.abspath(path))
    dir_fd = open_dir(folder)
    try:
        fd, tmp_name = _new_temp(dir_fd, name, suffix)
        os.close(fd)
    finally:
        os.close(dir_fd)
    tmp = os.path.join(folder, tmp_name)
    try:
        yield tmp
        if durable:
            durable_replace(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path, obj, *, dir_fd: int = None, durable: bool = True,
               final_newline: bool = True, **dump_kwargs) -> None:
    """json.dump(obj, **dump_kwargs) into path through atomic_write (UTF-8)."""
    with atomic_write(path, "w", dir_fd=dir_fd, durable=durable) as f:
        json.dump(obj, f, **dump_kwargs)
        if final_newline:
            f.write("\n")


def write_bytes(path, data: bytes, *, dir_fd: int = None, durable: bool = True) -> None:
    """data into path through atomic_write."""
    with atomic_write(path, "wb", dir_fd=dir_fd, durable=durable) as f:
        f.write(data)


# ---------------------------------------------------------------- durability

def durable_replace(tmp, path) -> None:
    """os.replace(tmp, path) that also survives a power cut: tmp's bytes reach
    the disk before the rename, and the rename (the folder entry) before this
    returns. A link at path is replaced, never followed (rename's rule); tmp
    must be the caller's own new file (create_file, replacing).

    Raises only BEFORE the rename (then path is untouched): once path is
    replaced, the caller must treat it as committed, so a failed folder sync
    after it is a warning, never an exception (a caller cleaning up on error
    would otherwise delete a committed file)."""
    fsync_file(tmp)
    os.replace(tmp, path)
    _sync_folder_after(os.path.dirname(os.path.abspath(path)), path)


def _rename(tmp, name, dir_fd, *, durable, shown):
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    if durable:
        _sync_folder_after(dir_fd, shown)


def _sync_folder_after(folder, path):
    try:
        fsync_dir(folder)
    except OSError as e:
        warnings.warn(f"{os.fsdecode(path)} is written, but syncing its folder failed ({e}); "
                      "it may not survive a power cut", RuntimeWarning, stacklevel=3)


def fsync_file(path) -> None:
    """fsync a regular file by name (opened read-only, a link is not followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Folder syncs some filesystems refuse (some FUSE, 9p, CIFS mounts; Windows):
# there the rename is as durable as the filesystem makes it.
_FSYNC_DIR_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF,
                          errno.EACCES, errno.EPERM, errno.EISDIR}


def fsync_dir(folder) -> None:
    """fsync a folder (a path or a descriptor), so renames in it are on disk."""
    if isinstance(folder, int):
        fd, owned = folder, False
    else:
        try:
            fd, owned = os.open(folder, os.O_RDONLY | os.O_CLOEXEC), True
        except OSError as e:
            if e.errno in _FSYNC_DIR_UNSUPPORTED:
                return
            raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _FSYNC_DIR_UNSUPPORTED:
            raise
    finally:
        if owned:
            os.close(fd)


# ---------------------------------------------------------------- removal

def remove_tree(path, *, dir_fd: int = None, ignore_errors: bool = False) -> None:
    """Removes path like `rm -rf`: a link (to a folder or anything) is unlinked
    itself; a real folder is removed with its contents without following any
    link inside it; a missing path is fine."""
    try:
        mode = os.lstat(path, dir_fd=dir_fd).st_mode
    except FileNotFoundError:
        return
    except OSError:
        if ignore_errors:
            return
        raise
    try:
        if stat.S_ISDIR(mode):
            if not shutil.rmtree.avoids_symlink_attacks:   # not on Linux/macOS
                raise UnsafePathError(errno.ENOTSUP, "no link-safe folder removal here",
                                      os.fsdecode(path))
            shutil.rmtree(path, dir_fd=dir_fd)
        else:
            os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        if not ignore_errors:
            raise


def remove_file(path, *, dir_fd: int = None) -> None:
    """Unlinks path if it exists (a link is removed, not its target)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path, dir_fd=dir_fd)


# ---------------------------------------------------------------- reading
#
# Files the tools READ from folders others filled (SRC, records, a model folder)
# are bounded the same way: opened with O_NONBLOCK (a FIFO or a device never
# blocks the open), checked with fstat to be a regular file AFTER opening (the
# name may have been swapped since a walk looked at it), and read up to the size
# fstat gives and a cap, never to an end that may not come (/dev/zero).

class NotRegularFileError(OSError):
    """A FIFO, device, socket or folder where a regular file is read, or a file over a cap."""


def open_regular(path, *, dir_fd: int = None, follow: bool = True) -> int:
    """A read-only descriptor of a regular file; NotRegularFileError otherwise.

    follow=False refuses a symbolic link at the last component (ELOOP).
    O_NONBLOCK is cleared again once fstat has shown a regular file.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file ({_kind(mode)})",
                                      os.fsdecode(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path, *, max_bytes: int, dir_fd: int = None, follow: bool = True) -> bytes:
    """The bytes of a regular file of at most max_bytes (its fstat size, read once).

    Raises NotRegularFileError for anything else or a larger file, OSError when
    the file cannot be opened. Memory: at most max_bytes.
    """
    fd = open_regular(path, dir_fd=dir_fd, follow=follow)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise NotRegularFileError(errno.EFBIG, f"too large: {size} bytes > {max_bytes}",
                                      os.fsdecode(path))
        return f.read(size)


# Folders nested deeper than this inside a folder the tools walk are skipped
# with a reason: a planted chain of 10,000 folders would otherwise exhaust
# Python's recursion limit (a traceback) or the path length.
MAX_FOLDER_DEPTH = 100

MAX_JSON_BYTES = 64 << 20     # info.json, model_info.json: far below this


def load_json(path, *, max_bytes: int = MAX_JSON_BYTES, dir_fd: int = None):
    """json.loads of a regular file; ValueError (one line) for bad or too deep JSON."""
    data = read_regular(path, max_bytes=max_bytes, dir_fd=dir_fd)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text: {e.reason}") from None


def _kind(mode) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


# ---------------------------------------------------------------- display

def show(value) -> str:
    """A path or name fit for a terminal line, a CSV cell or info.json.

    Names come from folders others filled: they may hold bytes that are not
    UTF-8 (shown as \\xNN), or control characters (an ANSI escape can clear or
    rewrite the screen, a newline can forge a line of output), shown as \\xNN,
    \\n, \\r, \\t. Printable text, any script, is kept as it is. Non-strings
    (numbers, None) pass unchanged.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if not isinstance(value, str):
        return value
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else _escape(c) for c in value)


def _escape(c) -> str:
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if c in named:
        return named[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"
