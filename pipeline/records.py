"""make_records: a folder of upright images becomes checked, sharded TFRecords.

    info = records.make_records(src="photos/", out="records/photos")

(Checking a written folder record by record, and its contact sheet:
records_inspect.py.)

make_records, step by step:
  1. Checks SRC and OUT (OUT not inside SRC; a non-empty OUT must be an
     earlier make_records output unless overwrite=True) and takes an exclusive
     lock on OUT (OUT/.make_records.lock, released by the kernel even when the
     process is killed), so two runs into one OUT cannot mix.
  2. Walks SRC recursively on bytes paths (any file name works, valid UTF-8
     or not), following symlinks but never into a folder it is already inside
     (symlink loops are reported, not followed). Hidden entries (".name") are
     ignored and counted. Symlinks to files or folders OUTSIDE SRC are followed
     (a folder of links is a common way to assemble a data set without
     copying) and listed with their targets in info.json
     ("links_outside_source"), since the records then depend on those files.
  3. Reads every candidate file in `workers` processes (forked, or from a
     forkserver once TensorFlow is imported, which must not be forked)
     with `imageio.read_upright`; each stored image is spilled to a scratch
     file in OUT so memory stays flat whatever the folder size. (With
     runner="beam", Beam workers read and keep the stored images in a
     work folder instead, and write the shards: records_beam.py.)
  4. Plans on the read results alone, by the rules in splits.py: exact
     duplicates (same sha256 of the file bytes) are stored once;
     near-duplicates, and paths with the same `group_by` key, form groups.
  5. Gives each group one split by a stable hash (splits.py), so adding images
     never moves old ones, except to keep one picture out of both splits.
  6. Refuses to write (raises MakeRecordsError, previous output left intact)
     when there are no images, when more than max_skipped_fraction of the
     candidates were skipped, or when a split would be empty.
  7. Writes the new shards and info.json complete into OUT/.make_records.new/
     while the previous output stays readable (a full disk or any write error
     leaves it intact), then swaps by renames alone: removes the previous
     info.json first (from then on no reader accepts the folder), then old
     shards, moves the new shards in, info.json last. Examples are ordered by
     sha256 within a split, so the bytes are identical whatever the number of
     workers, and each shard is a random mix of the folder. Shards hold
     100-200 MB each (one shard below 200 MB).

Files that fail are "skipped" (an image file that cannot be stored: counts
against max_skipped_fraction) or "ignored" (not an image at all, e.g. notes.txt,
hidden files, a second link to a folder already walked); both are listed in
info.json with their reason.
"""
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import errno
import fcntl
import functools
import multiprocessing
import os
import re
import stat
import statistics
import sys
import threading

from upright.pipeline import fileio, imageio, recordio, schema, splits
from upright.pipeline.records_read import (MakeRecordsError, ReadOptions, encode_stored,
                                           read_one, spool_result)

LOCK_FILE = ".make_records.lock"
SCRATCH_FILE = ".make_records.scratch"
STAGING_DIR = ".make_records.new"  # the next output, complete before it replaces the previous
SHARD_BYTES = 100 * 1000 * 1000   # shards hold [SHARD_BYTES, 2 * SHARD_BYTES) bytes
RUNNERS = ("local", "beam")
_SHARD_RE = re.compile(r"^(train|val)\.tfrecord-\d{5}-of-\d{5}$")


def make_records(*, src: str, out: str, val_fraction: float = 0.2,
                 max_side: int = imageio.DEFAULT_MAX_SIDE,
                 jpeg_quality: int = imageio.DEFAULT_JPEG_QUALITY,
                 workers: int = None, overwrite: bool = False,
                 max_skipped_fraction: float = 0.1,
                 max_pixels: int = imageio.DEFAULT_MAX_PIXELS,
                 progress: bool = True, arguments: dict = None,
                 num_shards: int = 0, runner: str = "local",
                 beam_options: list = None, group_by: str = None,
                 near_duplicate_threshold: float = imageio.NEAR_ABS) -> dict:
    """Turns the upright images under `src` into a records folder `out` (steps above).

    Args:
      src: folder of upright images (searched recursively).
      out: records folder to write (created if needed).
      val_fraction: in (0, 1], the expected share of pictures in "val"; 1 writes
        an evaluation-only folder with a "val" split and no "train" split.
      max_side: longest side of stored images in pixels; 0 keeps sizes.
      jpeg_quality: 1..100 for re-encoded images.
      workers: reader processes; None: all usable cores; 1: in this process.
      overwrite: allow a non-empty OUT that is not a make_records output (only
        make_records' own files in it are replaced; others are left alone).
      max_skipped_fraction: in [0, 1]; refuse when more candidates are skipped.
      max_pixels: images declaring more pixels are refused unread (bombs).
      progress: show a tqdm progress bar on stderr.
      arguments: the flags to record in info.json (default: the arguments above).
      num_shards: shards per split, at least one per input pipeline (each reads
        whole shard files); 0 (default) sizes them by bytes (100-200 MB each).
      runner: "local" (processes here) or "beam" (Beam workers read and write
        the shards, byte-identical: records_beam.py) with `beam_options`,
        e.g. ["--runner=DirectRunner", "--direct_num_workers=2"].
      group_by: None, or a regular expression whose match in a relative path is
        the image's group key (splits.py), e.g. r"^[^/]+" for one folder per subject.
      near_duplicate_threshold: grey levels (>= 0) at which two images are the
        same picture (imageio.NEAR_ABS = 4, measured; splits.py); 0: off.
    Returns:
      the info dict written to OUT/info.json.
    Raises:
      MakeRecordsError: with a one-line message saying what to do.
    """
    recorded = dict(val_fraction=val_fraction, max_side=max_side, jpeg_quality=jpeg_quality,
                    workers=workers, overwrite=overwrite, max_skipped_fraction=max_skipped_fraction,
                    max_pixels=max_pixels, num_shards=num_shards, runner=runner,
                    group_by=group_by, near_duplicate_threshold=near_duplicate_threshold)
    _check_arguments(**recorded)
    group_pattern = splits.compile_group_by(group_by)
    src_b, out_b = _check_folders(src, out, overwrite)
    with _locked(out_b) as lock:
        walk = _walk_source(src_b)
        finish = functools.partial(
            _plan_and_write, out_b=out_b, walk=walk, src_b=src_b, num_shards=num_shards,
            arguments=recorded if arguments is None else arguments, val_fraction=val_fraction,
            max_skipped_fraction=max_skipped_fraction, group_pattern=group_pattern,
            near_limit=near_duplicate_threshold)
        options = ReadOptions(max_side=max_side, jpeg_quality=jpeg_quality, max_pixels=max_pixels)
        if runner == "beam":
            return _make_on_beam(src_b, walk.files, options, beam_options, finish)
        return _make_locally(src_b, out_b, walk.files, options, finish, workers=workers,
                             progress=progress, lock_fd=lock)


def _make_locally(src_b, out_b, files, options, finish, *, workers, progress, lock_fd):
    """Reads in local processes through the scratch file in OUT; then `finish`."""
    scratch_path = os.path.join(out_b, os.fsencode(SCRATCH_FILE))
    try:
        # A new file of ours: a link planted at the name is removed, not followed.
        scratch_fd = fileio.create_file(scratch_path, replace=True, readable=True)
        with os.fdopen(scratch_fd, "w+b") as scratch:
            results, spans = _read_all(src_b, files, options, scratch, workers=workers,
                                       progress=progress, lock_fd=lock_fd)

            def write_splits(staging, planned, num_shards):
                return {split: recordio.write_split(
                            staging, split, _LazyExamples(items, spans, scratch),
                            num_shards[split])
                        for split, items in planned.items()}
            return finish(results, spans, write_splits)
    except OSError as e:
        # The scratch file (disk full, quota, file size limit): nothing of
        # OUT's previous output has been touched yet.
        raise MakeRecordsError(
            f"cannot write into {fileio.show(out_b)}: {_describe_os_error(e)}; the previous "
            "output there (if any) is untouched; free space and run again",
            refused=True) from None
    finally:
        fileio.remove_file(scratch_path)


def _make_on_beam(src_b, files, options, beam_options, finish):
    """Reads and writes the shards on Beam workers (records_beam.py); the plan
    runs here on their metadata, by the same `finish` as the local runner.
    No scratch file: no stored image's bytes reach this process."""
    from upright.pipeline import records_beam  # imports no records
    with records_beam.job(beam_options) as job:
        try:
            results, spans = records_beam.read_all(job, src_b, files, options)
        except OSError as e:   # the work folder (full, gone): OUT not touched yet
            raise MakeRecordsError(
                f"cannot use the Beam work folder {fileio.show(job.temp)}: "
                f"{_describe_os_error(e)}; the previous output (if any) is untouched",
                refused=True) from None
        return finish(results, spans, functools.partial(records_beam.write_splits, job,
                                                        spans=spans))


def _plan_and_write(results, spans, write_splits, *, out_b, walk, src_b, arguments,
                    num_shards, **plan_options):
    """Plans (step 4-6) and writes (step 7) the read results; both runners.

    Args:
      results: [records_read._Result] sorted by path, stored bytes elsewhere.
      spans: {rel: (where, length)}: where the stored bytes of an "ok" result
        are (the runner's business) and their length in bytes.
      write_splits: (staging folder, {split: [_Result]}, {split: num_shards})
        -> {split: info.json entry}; writes the shards into the staging folder.
    """
    plan = _plan(results, walk, src_b=src_b, **plan_options)
    _check_num_shards(plan, num_shards)
    return _write(out_b, plan, spans, write_splits, src_b=src_b, arguments=arguments,
                  num_shards=num_shards)


# ---------------------------------------------------------------- arguments


def _check_arguments(*, val_fraction, max_side, jpeg_quality, workers, max_skipped_fraction,
                     max_pixels, num_shards, runner, near_duplicate_threshold, **_others):
    """Refuses bad numbers and names (overwrite is any bool; group_by is checked
    by splits.compile_group_by)."""
    if not 0.0 < val_fraction <= 1.0:
        raise MakeRecordsError(f"val_fraction must be in (0, 1], got {val_fraction}")
    if max_side < 0:
        raise MakeRecordsError(f"max_side must be >= 0 (0 keeps sizes), got {max_side}")
    if not 1 <= jpeg_quality <= 100:
        raise MakeRecordsError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if workers is not None and workers < 1:
        raise MakeRecordsError(f"workers must be >= 1, got {workers}")
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise MakeRecordsError(
            f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
    if max_pixels < 1:
        raise MakeRecordsError(f"max_pixels must be >= 1, got {max_pixels}")
    if num_shards < 0:
        raise MakeRecordsError(f"num_shards must be >= 0 (0 = by size), got {num_shards}")
    if runner not in RUNNERS:
        raise MakeRecordsError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if not 0 <= near_duplicate_threshold < float("inf"):
        raise MakeRecordsError("near_duplicate_threshold must be >= 0 (0 = no near-duplicate "
                               f"grouping), got {near_duplicate_threshold}")


def _check_folders(src, out, overwrite):
    """Returns (src, out) as bytes paths after the refusals of step 1."""
    src_b, out_b = os.fsencode(src), os.fsencode(out)
    if not os.path.exists(src_b):
        raise MakeRecordsError(f"source folder {fileio.show(src_b)} does not exist")
    if not os.path.isdir(src_b):
        raise MakeRecordsError(f"source {fileio.show(src_b)} is not a folder")
    real_src, real_out = os.path.realpath(src_b), os.path.realpath(out_b)
    if real_out == real_src or real_out.startswith(real_src.rstrip(b"/") + b"/"):
        raise MakeRecordsError(
            f"output folder {fileio.show(out_b)} is inside the source folder {fileio.show(src_b)}: "
            "its records would be read as images next time; choose an --out outside it")
    if os.path.exists(out_b):
        if not os.path.isdir(out_b):
            raise MakeRecordsError(f"output {fileio.show(out_b)} exists and is not a folder")
        foreign = sorted(n for n in os.listdir(out_b) if not _is_own_file(n))
        if foreign and not overwrite:
            shown = ", ".join(fileio.show(n) for n in foreign[:3])
            raise MakeRecordsError(
                f"output folder {fileio.show(out_b)} is not empty and is not a make_records "
                f"output (it holds {shown}{', ...' if len(foreign) > 3 else ''}); "
                "choose another --out, or pass --overwrite to write into it anyway")
    return src_b, out_b


def _is_own_file(name: bytes) -> bool:
    """Files make_records itself puts into OUT."""
    text = name.decode("utf-8", "replace")
    base = text[:-len(recordio.TMP_SUFFIX)] if text.endswith(recordio.TMP_SUFFIX) else text
    return (base in (schema.INFO_FILE, LOCK_FILE, SCRATCH_FILE, STAGING_DIR)
            or _SHARD_RE.match(base) is not None)


@contextlib.contextmanager
def _locked(out_b):
    """Creates OUT if needed and holds its lock (`_lock`) for the block."""
    try:
        os.makedirs(out_b, exist_ok=True)
        lock = _lock(out_b)
    except OSError as e:   # read-only filesystem, no permission, disk full
        raise MakeRecordsError(
            f"cannot write into the output folder {fileio.show(out_b)}: {_describe_os_error(e)}; "
            "choose another --out") from None
    try:
        yield lock
    finally:
        _unlock(lock, out_b)


def _lock(out_b):
    """Exclusive, non-blocking flock on OUT/.make_records.lock (freed on death).

    The lock file is make_records' own: a link planted at its name is removed
    (the link, never its target; O_NOFOLLOW), anything but a regular file is
    refused. `_unlock` removes the file while still holding the lock, so a
    finished or refused run leaves none. A run that opened the file just
    before that removal and then wins the flock holds a lock on a file that no
    longer has the name: it sees that (the name leads to another inode or to
    nothing) and starts over, so two runs never both believe they hold it.
    """
    path = os.path.join(out_b, os.fsencode(LOCK_FILE))
    for _ in range(100):
        if _is_link(path):
            fileio.remove_file(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:     # planted again since the removal
                raise fileio.refusal(path) from None
            raise
        try:
            if _holds_lock_on_name(fd, path, out_b):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise MakeRecordsError(f"cannot take the lock in {fileio.show(out_b)}: it keeps being "
                           "replaced; is another program writing there?", refused=True)


def _holds_lock_on_name(fd, path, out_b) -> bool:
    """Locks fd; True when path still names fd's file (see _lock)."""
    mine = os.fstat(fd)
    if not stat.S_ISREG(mine.st_mode):
        raise fileio.refusal(path, "a special file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            raise MakeRecordsError(
                f"another make_records run (pid {holder or '?'}) is writing into "
                f"{fileio.show(out_b)}; wait for it to finish or choose another --out",
                refused=True) from None
        raise
    return _same_file(mine, path)


def _same_file(st, path) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _is_link(path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _unlock(fd, out_b):
    """Removes the lock file (only if its name still leads to the locked file),
    then releases the lock: see _lock for why this is safe for a waiting run."""
    path = os.path.join(out_b, os.fsencode(LOCK_FILE))
    try:
        if _same_file(os.fstat(fd), path):
            os.unlink(path)
    except OSError:
        pass   # a lock file left behind is harmless: the next run takes it
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


# ---------------------------------------------------------------- walking


@dataclasses.dataclass
class Walk:
    """Result of `find_files`: relative bytes paths and entries not read."""
    files: list        # [bytes] relative paths of regular files, sorted
    skipped: list      # [(rel bytes, reason)]: image candidates that cannot be read
    ignored: list      # [(rel bytes, reason)]: entries that are not candidates
    hidden: int = 0    # hidden entries (".name") not looked into
    # [(rel bytes, real target bytes)]: symlinks whose target is outside SRC
    # (followed, and listed in info.json: the records depend on those files too).
    outside: list = dataclasses.field(default_factory=list)
    real_src: bytes = b""


def _walk_source(src_b: bytes) -> Walk:
    """find_files, refusing a source with nothing to read (step 2)."""
    walk = find_files(src_b)
    if not walk.files:
        raise MakeRecordsError(f"no files to read under {fileio.show(src_b)} "
                               f"({_describe_empty(walk)})", refused=True)
    return walk


def find_files(src_b: bytes) -> Walk:
    """Walks src recursively, following symlinks but never around a loop.

    A folder reached again through a symlink is reported: as a "symlink loop"
    (skipped) when it is one of its own ancestors, else as a second path to a
    folder already walked (ignored: its files were read once already).
    """
    walk = Walk(files=[], skipped=[], ignored=[], real_src=os.path.realpath(src_b))
    top = os.stat(src_b)
    visited = {(top.st_dev, top.st_ino): b"."}
    _walk_folder(src_b, b"", ((top.st_dev, top.st_ino),), visited, walk)
    walk.files.sort()
    walk.skipped.sort()
    walk.outside.sort()
    walk.ignored.sort()
    return walk


def _walk_folder(src_b, rel_dir, ancestors, visited, walk):
    try:
        entries = sorted(os.scandir(os.path.join(src_b, rel_dir) if rel_dir else src_b),
                         key=lambda e: e.name)
    except OSError as e:
        walk.skipped.append((rel_dir, f"unreadable folder: {e.strerror}"))
        return
    for entry in entries:
        rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
        if entry.name.startswith(b"."):
            walk.hidden += 1
            continue
        try:
            st = os.stat(entry.path)   # follows symlinks
        except OSError as e:
            if e.errno == errno.ELOOP:
                walk.skipped.append((rel, "symlink loop: the link resolves to itself"))
            elif entry.is_symlink():
                walk.skipped.append((rel, "unreadable: broken symlink"))
            else:
                walk.skipped.append((rel, f"unreadable: {e.strerror}"))
            continue
        key = (st.st_dev, st.st_ino)
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not (target + b"/").startswith(walk.real_src.rstrip(b"/") + b"/"):
                walk.outside.append((rel, target))
        if stat.S_ISDIR(st.st_mode):
            if key in ancestors:
                walk.skipped.append(
                    (rel, f"symlink loop: points to its own ancestor folder {fileio.show(visited[key])}"))
            elif key in visited:
                walk.ignored.append(
                    (rel, f"same folder as {fileio.show(visited[key])}, already read"))
            elif len(ancestors) >= fileio.MAX_FOLDER_DEPTH:
                walk.skipped.append(
                    (rel, f"folder nested deeper than {fileio.MAX_FOLDER_DEPTH} levels: "
                          "not read"))
            else:
                visited[key] = rel
                _walk_folder(src_b, rel, ancestors + (key,), visited, walk)
        elif stat.S_ISREG(st.st_mode):
            walk.files.append(rel)
        else:
            # FIFOs, sockets, devices: opening a FIFO would block forever.
            walk.ignored.append((rel, "not a regular file"))


# ---------------------------------------------------------------- reading


def _read_all(src_b, files, options, scratch, *, workers, progress, lock_fd=None):
    """Reads all files; returns (results sorted by path, {rel: (offset, length)}).

    lock_fd: the OUT lock's descriptor, closed in forked readers so that only
    this process holds the lock (see `_init_reader`)."""
    import tqdm
    workers = workers or _usable_cores()
    workers = max(1, min(workers, len(files)))
    task = functools.partial(read_one, src_b=src_b, options=options)
    results, spans = [], {}
    executor = None
    if workers == 1:
        iterator = map(task, files)
    else:
        # Started before the progress bar, whose monitor thread must not be forked.
        context = _context()
        executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_reader,
            initargs=(lock_fd if context.get_start_method() == "fork" else None,))
        # Chunks amortise inter-process traffic; small enough to balance the tail.
        chunk = max(1, min(16, len(files) // (workers * 8)))
        iterator = executor.map(task, files, chunksize=chunk)
    # The shards need TensorFlow (about 3 s to import). The readers exist now
    # (forked before any thread), so import it meanwhile on the spare CPU time.
    # With TF_CPP_MIN_LOG_LEVEL set, its C++ start-up lines (which ignore that
    # variable) are dropped; the bar then writes to its own copy of stderr.
    quiet = (os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")
             and "tensorflow" not in sys.modules)
    bar_file = os.fdopen(os.dup(2), "w", buffering=1) if quiet else sys.stderr
    preload = threading.Thread(target=_import_tensorflow, args=(quiet,), daemon=True)
    preload.start()
    bar = tqdm.tqdm(total=len(files), unit="img", desc="make_records", disable=not progress,
                    file=bar_file, dynamic_ncols=True, smoothing=0.1)
    try:
        with bar:
            for result in iterator:
                results.append(spool_result(result, scratch, spans))
                bar.update(1)
    except concurrent.futures.process.BrokenProcessPool:
        raise MakeRecordsError(
            "a reader process died (out of memory, killed, or it could not start: with "
            "TensorFlow already imported, workers start by re-importing your main module, "
            "which therefore needs an `if __name__ == '__main__':` guard and a real file); "
            "pass workers=1 to read in this process", refused=True) from None
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        preload.join()
        if bar_file is not sys.stderr:
            bar_file.close()
    results.sort(key=lambda r: r.rel)
    return results, spans


def _init_reader(lock_fd):
    """Runs first in every reader process.

    A forked reader inherits the OUT lock (flock belongs to the open file, which
    it shares): it closes its copy, so the lock dies with the main process. And
    readers must not outlive the main process: killed with SIGKILL, it cannot
    stop them, and they would wait forever for work while holding memory (and,
    without the close, the lock, so every rerun would be refused). A daemon
    thread ends the reader within a quarter second of its parent's death.
    """
    if lock_fd is not None:
        try:
            os.close(lock_fd)
        except OSError:
            pass
    parent = os.getppid()

    def watch_parent():
        import time
        while os.getppid() == parent:
            time.sleep(0.25)
        os._exit(1)

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()


def _import_tensorflow(quiet: bool):
    """Imports TensorFlow; with quiet, file descriptor 2 points to /dev/null meanwhile."""
    saved = None
    if quiet:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    try:
        import tensorflow  # noqa: F401
    except Exception:  # the import in the write phase reports it properly
        pass
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)


def _context():
    """How reader processes start. A process that has imported TensorFlow must
    not fork (its thread pools and locks do not survive a fork), so then they
    come from a forkserver (or spawn); otherwise plain fork, which starts fast
    and does not re-import the caller's main module."""
    methods = multiprocessing.get_all_start_methods()
    if "tensorflow" not in sys.modules and "fork" in methods:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- planning


@dataclasses.dataclass
class _Plan:
    """What make_records writes: the kept images and their splits (splits.Plan),
    and what it found but does not store (for info.json)."""
    kept: splits.Plan
    skipped: list           # [(rel, reason)]
    ignored: list
    hidden: int
    candidates: int
    outside: list = ()      # [(rel, target)] symlinks to files/folders outside SRC
    near_limit: float = imageio.NEAR_ABS


def _plan(results, walk, *, val_fraction, max_skipped_fraction, src_b,
          group_pattern=None, near_limit=imageio.NEAR_ABS) -> _Plan:
    """The refusals of step 6 on what could not be read, then steps 4-5 and the
    empty-split refusal (splits.plan)."""
    skipped = sorted(walk.skipped + [(r.rel, r.reason) for r in results
                                     if r.status == "skipped"])
    ignored = sorted(walk.ignored + [(r.rel, r.reason) for r in results
                                     if r.status == "ignored"])
    candidates = len(walk.skipped) + sum(r.status != "ignored" for r in results)
    readable = [r for r in results if r.status == "ok"]
    details = [f"  skipped {fileio.show(rel)}: {reason}" for rel, reason in skipped]
    if not readable:
        raise MakeRecordsError(
            f"no images could be read under {fileio.show(src_b)}: {len(skipped)} skipped, "
            f"{len(ignored)} ignored ({_first_reason(skipped + ignored)})",
            details, refused=True)
    if skipped and len(skipped) > max_skipped_fraction * candidates:
        raise MakeRecordsError(
            f"{len(skipped)} of {candidates} image files ({len(skipped) / candidates:.0%}) "
            f"were skipped, more than max_skipped_fraction={max_skipped_fraction:g}; "
            "fix or remove them (reasons above), or raise --max_skipped_fraction",
            details, refused=True)
    try:
        kept = splits.plan(readable, val_fraction=val_fraction, group_pattern=group_pattern,
                           near_limit=near_limit)
    except MakeRecordsError as e:   # a split would be empty: the skipped files may say why
        e.details[:0] = details
        raise
    return _Plan(kept=kept, skipped=skipped, ignored=ignored, hidden=walk.hidden,
                 candidates=candidates, outside=list(walk.outside), near_limit=near_limit)


# ---------------------------------------------------------------- writing


class _LazyExamples:
    """The serialized examples of one split, read from the scratch file on demand
    (recordio.write_split slices it per shard; memory stays one image)."""

    def __init__(self, items, spans, scratch):
        self._items, self._spans, self._scratch = items, spans, scratch

    def __len__(self):
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return (self._example(r) for r in self._items[index])
        return self._example(self._items[index])

    def _example(self, r):
        offset, length = self._spans[r.rel]
        self._scratch.seek(offset)
        return encode_stored(r, self._scratch.read(length))


def num_shards_for(total_bytes: int) -> int:
    """Shards of 100-200 MB: floor(total / 100 MB), at least one."""
    return max(1, total_bytes // SHARD_BYTES)


def _check_num_shards(plan, num_shards):
    """Every shard must hold at least one image: an input pipeline given only
    empty files would stop while the other workers wait for it."""
    for split in plan.kept.splits:
        if num_shards > len(plan.kept.splits[split]):
            raise MakeRecordsError(
                f"num_shards={num_shards} but split {split!r} has only "
                f"{len(plan.kept.splits[split])} images; lower --num_shards", refused=True)


def _write(out_b, plan, spans, write_splits, *, src_b, arguments, num_shards=0) -> dict:
    """Writes the new output beside the previous one, then swaps it in.

    All new shards and info.json are first written complete into OUT/STAGING_DIR
    while the previous output stays untouched and readable: running out of space
    (or any other write error) there leaves it intact. Only then `_commit`
    swaps, by removals and renames alone, which need no free space.
    `write_splits` writes the shards (see _plan_and_write): here, or on Beam.
    """
    import tensorflow as tf
    staging_b = os.path.join(out_b, os.fsencode(STAGING_DIR))
    try:
        fileio.remove_tree(staging_b)     # left behind by a killed run (or a planted link)
        os.mkdir(staging_b)
        shards = {split: num_shards or num_shards_for(
                      sum(spans[r.rel][1] + 200 for r in items))   # + proto/record overhead
                  for split, items in plan.kept.splits.items()}
        entries = write_splits(os.fsdecode(staging_b), plan.kept.splits, shards)
        info = recordio.write_info(os.fsdecode(staging_b), entries,
                                   **_provenance(plan, spans, src_b=src_b, arguments=arguments))
    except (OSError, tf.errors.OpError) as e:
        fileio.remove_tree(staging_b, ignore_errors=True)
        raise MakeRecordsError(
            f"cannot write the records into {fileio.show(out_b)}: {_describe_os_error(e)}; "
            "the previous output there (if any) is untouched; free space and run again",
            refused=True) from None
    except BaseException:   # e.g. a failed Beam pipeline: no half-written staging left
        fileio.remove_tree(staging_b, ignore_errors=True)
        raise
    try:
        _commit(out_b, staging_b, entries)
    except OSError as e:
        raise MakeRecordsError(
            f"cannot move the new records into place in {fileio.show(out_b)}: "
            f"{_describe_os_error(e)}; it holds no output a reader accepts now; "
            "run again", refused=True) from None
    return info


def _provenance(plan, spans, *, src_b, arguments) -> dict:
    """info.json's provenance fields (everything but the splits)."""
    kept = [r for items in plan.kept.splits.values() for r in items]
    corrupt_exif = sorted(r.rel for r in kept if imageio.CORRUPT_EXIF_NOTE in r.image.notes)
    provenance = {
        "created_by": "make_records",
        "source": fileio.show(os.path.abspath(src_b)),
        "arguments": arguments,
        "counts": {
            "candidates": plan.candidates,
            "stored": len(kept),
            "train": len(plan.kept.splits.get("train", [])),
            "val": len(plan.kept.splits.get("val", [])),
            "skipped": len(plan.skipped),
            "ignored": len(plan.ignored),
            "hidden_ignored": plan.hidden,
            "duplicates": len(plan.kept.duplicates),
            "near_duplicate_groups": len(plan.kept.groups),
            "images_in_near_duplicate_groups": sum(len(g) for g in plan.kept.groups),
            "largest_group": plan.kept.largest_group,
            "stored_unchanged": sum(not r.image.changed for r in kept),
            "exif_turned": sum(any(n.startswith("exif_orientation") for n in r.image.notes)
                               for r in kept),
            "converted_mode": sum(any(n.startswith("mode=") for n in r.image.notes)
                                  for r in kept),
            "animated_first_frame": sum("animated: first frame" in r.image.notes
                                        for r in kept),
            "resized": sum("resized" in r.image.notes for r in kept),
            "corrupt_exif_ignored": len(corrupt_exif),
            "links_outside_source": len(plan.outside),
        },
        # Stored images whose EXIF block Pillow found damaged and ignored (as
        # viewers do): the pixels are stored as they show, with no EXIF turn.
        "corrupt_exif_ignored": [fileio.show(rel) for rel in corrupt_exif],
        "group_by": plan.kept.named_groups,
        "near_duplicate_threshold": plan.near_limit,
        "links_outside_source": [{"path": fileio.show(rel), "target": fileio.show(target)}
                                 for rel, target in plan.outside],
        "image_stats": _image_stats(kept, spans),
        "skipped": [{"path": fileio.show(rel), "reason": reason} for rel, reason in plan.skipped],
        "ignored": [{"path": fileio.show(rel), "reason": reason} for rel, reason in plan.ignored],
        "duplicates": [{"path": fileio.show(rel), "duplicate_of": fileio.show(of)}
                       for rel, of in plan.kept.duplicates],
        "near_duplicate_groups": [[fileio.show(rel) for rel in g] for g in plan.kept.groups],
        "stored_image": {"color": "RGB, 8-bit", "format": "jpeg",
                         "alpha_background": list(imageio.BACKGROUND),
                         "exif_orientation": "applied; stored images carry no orientation tag",
                         "unchanged_sources": "RGB JPEGs without an EXIF turn and within "
                                              "max_side are stored byte for byte"},
    }
    return provenance


def _commit(out_b, staging_b, entries):
    """Replaces OUT's previous output by the complete one in staging.

    Order: the previous info.json goes first (from then on no reader accepts
    the folder), then the previous shards; the new shards move in, info.json
    last. A kill at any point leaves the previous output, a folder readers
    refuse, or the new output.
    """
    _remove_previous_output(out_b)
    for split in entries:
        for name in entries[split]["shards"]:
            name_b = os.fsencode(name)
            os.replace(os.path.join(staging_b, name_b), os.path.join(out_b, name_b))
    info_b = os.fsencode(schema.INFO_FILE)
    os.replace(os.path.join(staging_b, info_b), os.path.join(out_b, info_b))
    fileio.fsync_dir(out_b)
    fileio.remove_tree(staging_b)


def _describe_os_error(e) -> str:
    """'No space left on device (path)' for an OSError or TensorFlow's OpError."""
    if isinstance(e, OSError):
        where = f" ({fileio.show(e.filename)})" if e.filename else ""
        return f"{e.strerror or e}{where}"
    lines = (getattr(e, "message", "") or str(e)).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _remove_previous_output(out_b):
    """info.json first (then no reader accepts the folder), then old shards."""
    info = os.path.join(out_b, os.fsencode(schema.INFO_FILE))
    if os.path.exists(info):
        os.remove(info)
        fileio.fsync_dir(out_b)
    for name in os.listdir(out_b):
        text = name.decode("utf-8", "replace")
        if _is_own_file(name) and text not in (LOCK_FILE, SCRATCH_FILE, STAGING_DIR):
            os.remove(os.path.join(out_b, name))


def _image_stats(kept, spans) -> dict:
    def describe(values):
        return {"min": min(values), "median": statistics.median(values),
                "mean": round(statistics.fmean(values), 1), "max": max(values)}

    source_mp = [r.image.source_height * r.image.source_width / 1e6 for r in kept]
    return {
        "source_width": describe([r.image.source_width for r in kept]),
        "source_height": describe([r.image.source_height for r in kept]),
        "source_megapixels": {k: round(v, 3) for k, v in describe(source_mp).items()},
        "stored_width": describe([r.image.width for r in kept]),
        "stored_height": describe([r.image.height for r in kept]),
        "stored_bytes": describe([spans[r.rel][1] for r in kept]),
        "stored_bytes_total": sum(spans[r.rel][1] for r in kept),
        "source_formats": dict(sorted(collections.Counter(
            r.image.source_format for r in kept).items())),
    }


# ---------------------------------------------------------------- display


def _describe_empty(walk) -> str:
    if walk.skipped or walk.ignored:
        return (f"{len(walk.ignored)} ignored, {len(walk.skipped)} skipped: "
                f"{_first_reason(walk.skipped + walk.ignored)}")
    hidden = f"; {walk.hidden} hidden entries ignored" if walk.hidden else ""
    return f"the folder is empty{hidden}"


def _first_reason(entries) -> str:
    if not entries:
        return ""
    rel, reason = entries[0]
    return f"e.g. {fileio.show(rel)}: {reason}"


def format_summary(info: dict) -> str:
    """A few human lines about a finished make_records run."""
    c = info["counts"]
    entries = info["splits"]
    lines = [
        f"wrote {c['stored']} images: " + ", ".join(
            f"{split} {entry['num_examples']} in {len(entry['shards'])} shard(s)"
            for split, entry in sorted(entries.items(), key=lambda kv: kv[0] != "train")),
        f"skipped {c['skipped']}, ignored {c['ignored']} (+{c['hidden_ignored']} hidden), "
        f"exact duplicates {c['duplicates']}, near-duplicate groups "
        f"{c['near_duplicate_groups']} ({c['images_in_near_duplicate_groups']} images), "
        f"largest group {c.get('largest_group', 1)}",
        f"stored unchanged {c['stored_unchanged']}, resized {c['resized']}, "
        f"EXIF-turned {c['exif_turned']}, colour-converted {c['converted_mode']}",
    ]
    damaged = info.get("corrupt_exif_ignored") or []
    if damaged:
        lines.append(f"corrupt EXIF data ignored in {len(damaged)} (stored as their pixels "
                     f"show): {', '.join(damaged[:5])}"
                     + (f" ... and {len(damaged) - 5} more (see info.json)"
                        if len(damaged) > 5 else ""))
    hint = splits.large_group_hint(c.get("largest_group", 1), c["stored"],
                                   bool(info.get("group_by")))
    if hint:
        lines.append(f"warning: {hint}")
    named = info.get("group_by")
    if named:
        lines.append(f"--group_by: {named['keys']} keys, {named['split_groups']} groups split "
                     f"as units, {named['unmatched']} paths did not match")
    for entry in info["skipped"][:20]:
        lines.append(f"  skipped {fileio.show(entry['path'])}: {fileio.show(entry['reason'])}")
    if len(info["skipped"]) > 20:
        lines.append(f"  ... and {len(info['skipped']) - 20} more (see info.json)")
    return "\n".join(lines)
