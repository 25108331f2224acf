"""fileio: no write, replace or removal ever goes through a link planted in a folder."""
import errno
import os

import pytest

from upright.pipeline import fileio
from tests import helpers

VICTIM_BYTES = b"precious, not the tool's\n"


def victim_file(tmp_path):
    """A file outside the folders the tool writes into, with known bytes."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    victim = outside / "victim.txt"
    victim.write_bytes(VICTIM_BYTES)
    return victim


def victim_dir(tmp_path):
    """A folder outside with two files; returns (folder, its listing with bytes)."""
    folder = tmp_path / "outside_dir"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"a")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_bytes(b"b")
    return folder, helpers.listing(folder)





# ---------------------------------------------------------------- replace


@pytest.mark.parametrize("mode", ["w", "wb"])
def test_atomic_write_replaces_a_planted_link_and_never_writes_through_it(tmp_path, mode):
    victim = victim_file(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    os.symlink(victim, folder / "result.json")
    with fileio.atomic_write(str(folder / "result.json"), mode) as f:
        f.write("new" if mode == "w" else b"new")
    assert victim.read_bytes() == VICTIM_BYTES
    assert helpers.is_regular(folder / "result.json")
    assert (folder / "result.json").read_bytes() == b"new"
    assert os.listdir(folder) == ["result.json"]           # no temporary left


def test_atomic_write_relative_to_a_folder_descriptor(tmp_path):
    victim = victim_file(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    os.symlink(victim, folder / "x.bin")
    fd = fileio.open_dir(str(folder))
    try:
        fileio.write_bytes("x.bin", b"\x00\x01", dir_fd=fd)
    finally:
        os.close(fd)
    assert victim.read_bytes() == VICTIM_BYTES
    assert (folder / "x.bin").read_bytes() == b"\x00\x01" and helpers.is_regular(folder / "x.bin")


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(str(path)) as f:
            f.write("half")
            raise RuntimeError("disk full, say")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_write_json_bytes(tmp_path):
    path = tmp_path / "info.json"
    fileio.write_json(str(path), {"b": 1, "a": "é"}, indent=2, sort_keys=True,
                      ensure_ascii=False)
    assert path.read_bytes() == '{\n  "a": "é",\n  "b": 1\n}\n'.encode()
    fileio.write_json(str(path), [1], final_newline=False)
    assert path.read_bytes() == b"[1]"


def _temp_name_seen(path):
    """The temporary name atomic_write uses for `path` (listed inside the block)."""
    with fileio.atomic_write(str(path)) as f:
        f.write("x")
        names = [n for n in os.listdir(path.parent)
                 if n != path.name and not os.path.islink(path.parent / n)]
    assert len(names) == 1
    return names[0]


def test_temporary_names_are_unguessable_and_a_planted_one_is_never_used(tmp_path):
    victim = victim_file(tmp_path)
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "metrics.json"
    first = _temp_name_seen(path)
    # Plant a link at the name just used (and at the old pid-based pattern):
    # the next write picks another random name and the victim stays untouched.
    os.symlink(victim, folder / first)
    os.symlink(victim, folder / f".metrics.json-{os.getpid()}.tmp")
    names = {_temp_name_seen(path) for _ in range(20)}
    assert first not in names and len(names) == 20
    for name in names:
        assert name.startswith(".metrics.json.") and name.endswith(".tmp")
        assert len(name.split(".")[-2]) == 16              # 64 random bits, hex
    assert victim.read_bytes() == VICTIM_BYTES
    assert path.read_text() == "x" and helpers.is_regular(path)


def test_long_names_keep_their_temporary_under_the_255_byte_limit(tmp_path):
    name = "a" * 251 + ".jpg"
    fileio.write_bytes(str(tmp_path / name), b"x")
    assert (tmp_path / name).read_bytes() == b"x"


def test_replacing_keeps_the_suffix_and_replaces_a_planted_link(tmp_path):
    victim = victim_file(tmp_path)
    os.symlink(victim, tmp_path / "model.keras")
    with fileio.replacing(str(tmp_path / "model.keras"), suffix=".keras") as tmp:
        assert tmp.endswith(".keras") and helpers.is_regular(tmp) and os.path.getsize(tmp) == 0
        with open(tmp, "wb") as f:
            f.write(b"model")
    assert victim.read_bytes() == VICTIM_BYTES
    assert (tmp_path / "model.keras").read_bytes() == b"model"
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "outside"]


# ---------------------------------------------------------------- create, append


def test_create_file_never_opens_a_link_or_an_existing_file(tmp_path):
    victim = victim_file(tmp_path)
    os.symlink(victim, tmp_path / "scratch")
    with pytest.raises(FileExistsError):
        fileio.create_file(str(tmp_path / "scratch"))
    fd = fileio.create_file(str(tmp_path / "scratch"), replace=True, readable=True)
    os.write(fd, b"scratch data")
    os.close(fd)
    assert victim.read_bytes() == VICTIM_BYTES
    assert helpers.is_regular(tmp_path / "scratch")
    assert (tmp_path / "scratch").read_bytes() == b"scratch data"


def test_open_append_refuses_a_link_and_a_fifo(tmp_path):
    victim = victim_file(tmp_path)
    os.symlink(victim, tmp_path / "log.jsonl")
    with pytest.raises(fileio.UnsafePathError) as caught:
        fileio.open_append(str(tmp_path / "log.jsonl"))
    assert caught.value.errno == errno.ELOOP and "symbolic link" in str(caught.value)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(fileio.UnsafePathError, match="special file"):
        fileio.open_append(str(tmp_path / "fifo"))
    with fileio.open_append(str(tmp_path / "real.jsonl")) as f:
        f.write("1\n")
    with fileio.open_append(str(tmp_path / "real.jsonl")) as f:
        f.write("2\n")
    assert (tmp_path / "real.jsonl").read_text() == "1\n2\n"
    assert victim.read_bytes() == VICTIM_BYTES


# ---------------------------------------------------------------- folders


def test_open_dirs_refuses_a_link_inside_the_named_folder(tmp_path):
    target, before = victim_dir(tmp_path)
    root = tmp_path / "dst"
    root.mkdir()
    os.symlink(target, root / "sub")
    with pytest.raises(fileio.UnsafePathError, match="symbolic link") as caught:
        fileio.open_dirs(str(root), "sub/deeper")
    assert caught.value.filename == "sub"
    assert helpers.listing(target) == before
    (root / "file").write_bytes(b"")
    with pytest.raises(fileio.UnsafePathError, match="a file"):
        fileio.make_dirs(str(root), "file/x")
    with pytest.raises(fileio.UnsafePathError, match=r"'\.\.'"):
        fileio.make_dirs(str(root), "../escape")
    # Real folders are created, one component at a time.
    made = fileio.make_dirs(str(root), os.path.join("a", "b", "c"))
    assert os.path.isdir(made) and made == str(root / "a" / "b" / "c")
    fd = fileio.open_dirs(str(root), b"a/./b")             # bytes names work too
    os.close(fd)


# ---------------------------------------------------------------- removal


def test_remove_tree_on_a_link_removes_only_the_link(tmp_path):
    target, before = victim_dir(tmp_path)
    link = tmp_path / "staging"
    os.symlink(target, link)
    fileio.remove_tree(str(link))
    assert not os.path.lexists(link)
    assert helpers.listing(target) == before
    # A real folder holding a link to the victim: the folder goes, the victim stays.
    real = tmp_path / "real"
    (real / "inner").mkdir(parents=True)
    os.symlink(target, real / "inner" / "to_victim")
    os.symlink(target / "a.txt", real / "file_link")
    fileio.remove_tree(str(real))
    assert not os.path.lexists(real)
    assert helpers.listing(target) == before
    fileio.remove_tree(str(tmp_path / "missing"))          # nothing there: fine


# ---------------------------------------------------------------- durability


def _spy(monkeypatch):
    """Records fsync (the file or folder synced) and rename events, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        events.append(("rename", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_durable_replace_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                               monkeypatch):
    events = _spy(monkeypatch)
    tmp, path = tmp_path / "x.tmp", tmp_path / "x.json"
    tmp.write_text("{}")
    fileio.durable_replace(str(tmp), str(path))
    assert events == [str(tmp), ("rename", "x.tmp", "x.json"), str(tmp_path)]
    assert path.read_text() == "{}" and not tmp.exists()


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                            monkeypatch):
    events = _spy(monkeypatch)
    fileio.write_json(str(tmp_path / "m.json"), {})
    assert len(events) == 3
    tmp = os.path.basename(events[0])
    assert events[0] == str(tmp_path / tmp) and tmp.startswith(".m.json.")
    assert events[1:] == [("rename", tmp, "m.json"), str(tmp_path)]
    events.clear()
    fileio.write_json(str(tmp_path / "m.json"), {}, durable=False)
    assert [e[0] for e in events] == ["rename"]


def test_durable_replace_never_raises_after_the_rename(tmp_path, monkeypatch):
    """Once the file is renamed in it is committed: a folder sync the filesystem
    refuses is skipped quietly, any other failure is a warning, never an
    exception (the trainer's clean-up on error would delete the committed file)."""
    calls = []

    def refusing_fsync(fd):
        calls.append(fd)
        raise OSError(errno.EINVAL, "Invalid argument")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "I/O error")

    for fake, warns in ((refusing_fsync, False), (failing_fsync, True)):
        for write in ("durable_replace", "write_json"):
            tmp, path = tmp_path / "x.tmp", tmp_path / "x.json"
            tmp.write_text('"new"')
            real = os.fsync
            # The file's own sync is real; only the folder's fails.
            monkeypatch.setattr(os, "fsync", lambda fd, fake=fake: (
                fake(fd) if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")) else real(fd)))

            def run():
                if write == "durable_replace":
                    fileio.durable_replace(str(tmp), str(path))
                else:
                    fileio.write_json(str(path), "new", final_newline=False)
                    tmp.unlink()
            if warns:
                with pytest.warns(RuntimeWarning, match="syncing its folder failed"):
                    run()
            else:
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    run()
            assert path.read_text() == '"new"' and not tmp.exists()
            monkeypatch.undo()
    assert calls   # the refused sync was tried
