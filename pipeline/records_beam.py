"""make_records on Apache Beam: the reading and the shard writing run on the workers.

    records.make_records(src="photos/", out="records/photos", runner="beam",
                         beam_options=["--runner=DirectRunner", "--direct_num_workers=2"])
    make_records --src photos/ --runner beam --beam_pipeline_options="--direct_num_workers=2"

Two Beam pipelines, with the plan between them on the launcher:
  1. `read_all` (pass 1, workers): `records_read.read_one` for every file -- the
     SAME function the local mode maps over its reader processes (read as a
     person sees it, EXIF, modes, bombs, resize, re-encode, sha256,
     near-duplicate signature). Each worker appends the stored (re-encoded)
     images of a chunk of files to one store file in the temp location and
     sends back only metadata: path, status, digest, sizes, the 768-byte
     signature, and where the bytes lie (store file, offset, length).
  2. the launcher (records.py, the same code as local mode): exact duplicates,
     near-duplicate groups, the stable-hash split, the refusals, the number of
     shards. It holds O(n) metadata, never an image's bytes.
  3. `write_splits` (pass 2, workers): one element per output shard; the
     launcher writes each shard's ordered list of images to a plan file, and a
     worker copies their stored bytes from the store files into the shard with
     recordio.write_shard (the local writer's code: temporary name, fsync,
     rename) inside OUT's staging folder. The launcher then writes info.json and
     swaps the output in, as in local mode, so the records are byte-identical.

Requirements on the runner: its workers read SRC, write into OUT and reach the
temp location at the same paths as the launcher, with plain file calls
(DirectRunner; Flink, Spark or Dataflow with a shared filesystem: NFS, or an
object store mounted as one, e.g. gcsfuse). The file list goes to the workers
through a text file (not beam.Create, which would embed millions of paths in
the job graph); the metadata comes back as pickled records in TFRecord files.
The work folder (store files, plans, metadata): a fresh folder under
`--make_records_temp=<folder>` (make_records' own pipeline option), else
under `--temp_location` when it is a folder path, else under the system temp
folder (fine for DirectRunner and single-host Flink/Spark). On a cluster it
must be a folder every worker shares; Dataflow wants a gs:// --temp_location
for itself, so pass both there. It holds about the stored images' size (as
local mode's scratch file) and is removed at the end.
"""
import contextlib
import dataclasses
import functools
import os
import pickle
import sys
import tempfile
import uuid

from upright.pipeline import fileio, recordio, records_read, schema

_LIST_FILE = "files.txt"
_RESULTS_PREFIX = "results"
_STORE_DIR = "stored"       # pass 1's store files: stored image bytes, one file per chunk
_PLAN_DIR = "shards"        # pass 2's input: one pickled image list per output shard
_CHUNK = 64                 # files per pass-1 element (and per store file) at most
_TEMP_OPTION = "--make_records_temp"   # our work folder, when --temp_location is a URL


@dataclasses.dataclass(frozen=True)
class Job:
    """One make_records run on Beam: its pipeline options and its temp folder."""
    options: object         # apache_beam PipelineOptions
    temp: str               # folder for the file list, store files, plans and results


@contextlib.contextmanager
def job(beam_options):
    """Yields a Job for `beam_options` (list of str; [] -> DirectRunner); removes
    its temp folder at exit.

    The temp folder: under `--make_records_temp=<folder>` (make_records' own
    option, taken out before Beam sees the rest), else under --temp_location
    when that is a folder path, else under the system temp folder.
    Raises:
      records_read.MakeRecordsError: Beam is not installed, or no usable temp folder.
    """
    try:
        from apache_beam.options import pipeline_options
    except ImportError:
        raise records_read.MakeRecordsError(
            "--runner=beam needs Apache Beam: pip install 'upright-orientation[beam]' "
            "(or pip install 'apache-beam[tfrecord]>=2.60,<3')") from None
    ours = [o for o in beam_options or [] if o.startswith(_TEMP_OPTION + "=")]
    opts = pipeline_options.PipelineOptions(
        [o for o in beam_options or [] if o not in ours])
    where = (ours[-1][len(_TEMP_OPTION) + 1:] if ours
             else opts.view_as(pipeline_options.GoogleCloudOptions).temp_location)
    if where and "://" in where:
        # The workers read and write it with plain file calls (as SRC and OUT).
        raise records_read.MakeRecordsError(
            f"make_records on Beam needs a folder path that the workers and this machine "
            f"share (NFS, or a bucket mounted with gcsfuse), not {where}: pass "
            f"{_TEMP_OPTION}=<shared folder> among the pipeline options")
    try:
        temp = (os.path.join(where, f"make_records-{uuid.uuid4().hex}") if where
                else tempfile.mkdtemp(prefix="make_records_beam_"))
        for sub in ("", _STORE_DIR, _PLAN_DIR):
            os.makedirs(os.path.join(temp, sub), exist_ok=True)
    except OSError as e:
        raise records_read.MakeRecordsError(
            f"cannot make the Beam temp folder under {where or tempfile.gettempdir()}: "
            f"{e.strerror or e}; pass {_TEMP_OPTION}=<a writable shared folder>",
            refused=True) from None
    try:
        yield Job(opts, temp)
    finally:
        fileio.remove_tree(temp, ignore_errors=True)


def _run(job_: Job, build) -> None:
    """Runs the pipeline that build(pipeline) sets up; one-line errors.

    Raises:
      records_read.MakeRecordsError: the pipeline failed (a worker's exception
        arrives wrapped by the runner, as many types: its type and first line).
    """
    import apache_beam as beam
    try:
        with beam.Pipeline(options=job_.options) as p:
            build(p)
    except records_read.MakeRecordsError:
        raise
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise records_read.MakeRecordsError(
            f"the Beam pipeline failed: {type(e).__name__}: {message}"[:300],
            refused=True) from e


# ---------------------------------------------------------------- pass 1: read


def read_all(job_: Job, src_b: bytes, files: list, options):
    """Runs records_read.read_one over `files` on the workers (pass 1).

    Args:
      job_: from `job`.
      src_b: SRC as a bytes path.
      files: relative bytes paths (records.find_files().files), sorted.
      options: records_read.ReadOptions.
    Returns:
      (results sorted by path: [_Result], the stored images' `encoded` == b"";
       spans: {rel: ((store file name, offset), length in bytes)} per "ok" result).
    Raises:
      records_read.MakeRecordsError: the pipeline failed or lost files.
    """
    import apache_beam as beam
    list_path = os.path.join(job_.temp, _LIST_FILE)
    chunk = max(1, min(_CHUNK, len(files) // 256))   # small folders: still spread
    with os.fdopen(fileio.create_file(list_path), "w", encoding="ascii") as f:
        # Hex: file names are arbitrary bytes, the text source reads lines.
        f.writelines(" ".join(rel.hex() for rel in files[i:i + chunk]) + "\n"
                     for i in range(0, len(files), chunk))
    prefix = os.path.join(job_.temp, _RESULTS_PREFIX)
    task = functools.partial(read_chunk, src_b=src_b, options=options,
                             store_dir=os.path.join(job_.temp, _STORE_DIR))
    _run(job_, lambda p: (
        p
        | "ListFiles" >> beam.io.ReadFromText(list_path)
        # One text file is one bundle: redistribute so that every worker reads.
        | "Spread" >> beam.Reshuffle()
        | "ReadChunk" >> beam.FlatMap(task)
        | "Write" >> beam.io.WriteToTFRecord(prefix, coder=beam.coders.BytesCoder())))
    results, spans = collect_results(prefix)
    if len(results) != len(files):
        raise records_read.MakeRecordsError(
            f"the Beam pipeline returned {len(results)} results for {len(files)} files",
            refused=True)
    return results, spans


def read_chunk(line: str, *, src_b: bytes, options, store_dir: str) -> list:
    """Reads one line of the file list on a worker; returns its metadata.

    The stored images go to one new store file (a fresh name per attempt, so a
    retried or speculative attempt never writes into another's file).
    Returns:
      [pickle of (_Result with image.encoded == b"", (store name, offset, length)
       or None when not "ok")], one per file of the line.
    """
    out, store, name = [], None, f"{uuid.uuid4().hex}.stored"
    try:
        for rel in (bytes.fromhex(h) for h in line.split()):
            result = records_read.read_one(rel, src_b=src_b, options=options)
            where = None
            if result.status == "ok":
                if store is None:
                    store = os.fdopen(fileio.create_file(os.path.join(store_dir, name)), "wb")
                where = (name, store.tell(), len(result.image.encoded))
                store.write(result.image.encoded)
                result.image = dataclasses.replace(result.image, encoded=b"")
            out.append(pickle.dumps((result, where)))
    finally:
        if store is not None:
            store.close()   # before the results leave this worker: pass 2 reads it
    return out


def collect_results(prefix: str):
    """Reads pass 1's metadata back; same return as read_all.

    Refuses any result that still carries stored bytes: the launcher holds
    metadata only, whatever the workers send.
    """
    import glob
    import tensorflow as tf
    paths = sorted(glob.glob(glob.escape(prefix) + "*"))
    results, spans = [], {}
    for serialized in tf.data.TFRecordDataset(paths):
        result, where = pickle.loads(serialized.numpy())
        if result.image is not None and result.image.encoded:
            raise records_read.MakeRecordsError(
                f"a Beam worker sent the stored bytes of {fileio.show(result.rel)} back "
                "to the launcher (a bug: they belong in the store files)", refused=True)
        if where is not None:
            # One string per store file, not per image (~80 MB at 1M images).
            spans[result.rel] = ((sys.intern(where[0]), where[1]), where[2])
        results.append(result)
    results.sort(key=lambda r: r.rel)
    return results, spans


# ---------------------------------------------------------------- pass 2: write


def write_splits(job_: Job, staging: str, splits: dict, num_shards: dict, *, spans) -> dict:
    """Writes every split's shards into `staging` on the workers (pass 2).

    Args:
      job_: from `job`, after read_all.
      staging: the folder the shards go to (OUT's staging folder).
      splits: {split: [_Result] in final order} (the plan's).
      num_shards: {split: shards >= 1}.
      spans: read_all's.
    Returns:
      {split: info.json entry}, as recordio.write_split returns.
    """
    import apache_beam as beam
    shards = []
    for split, items in splits.items():
        for index, (lo, hi) in enumerate(recordio.shard_bounds(len(items), num_shards[split])):
            name = schema.shard_name(split, index, num_shards[split])
            # The signature (768 bytes) is the plan's business, not the shard's.
            fileio.write_bytes(os.path.join(job_.temp, _PLAN_DIR, name), pickle.dumps(
                [(dataclasses.replace(r, image=dataclasses.replace(r.image, signature=None)),
                  spans[r.rel]) for r in items[lo:hi]]), durable=False)
            shards.append(name)
    task = functools.partial(write_planned_shard, staging=staging, temp=job_.temp)
    try:
        _run(job_, lambda p: (
            p | "Shards" >> beam.Create(shards) | "Spread" >> beam.Reshuffle()
            | "WriteShard" >> beam.Map(task)))
    except records_read.MakeRecordsError as e:
        raise records_read.MakeRecordsError(
            f"{e}; the previous output in {fileio.show(os.path.dirname(staging))} (if any) "
            "is untouched", refused=True) from e
    return {split: _entry(staging, split, len(items), num_shards[split])
            for split, items in splits.items()}


def write_planned_shard(name: str, *, staging: str, temp: str) -> None:
    """Writes shard `name` on a worker: its plan's images, in order, from the
    store files into staging/name (atomically, under a temporary name of this
    attempt's own)."""
    with open(os.path.join(temp, _PLAN_DIR, name), "rb") as f:
        planned = pickle.load(f)

    def examples():
        for result, ((store, offset), length) in planned:
            with open(os.path.join(temp, _STORE_DIR, store), "rb") as f:
                encoded = os.pread(f.fileno(), length, offset)
            if len(encoded) != length:
                raise OSError(f"store file {store} is {length - len(encoded)} bytes short "
                              f"for {fileio.show(result.rel)}; was the temp location changed?")
            yield records_read.encode_stored(result, encoded)

    recordio.write_shard(staging, name, examples(),
                         tmp_name=f"{name}.{uuid.uuid4().hex}{recordio.TMP_SUFFIX}")


def _entry(staging: str, split: str, n: int, num_shards: int) -> dict:
    """A split's info.json entry from the shards the workers wrote (as write_split's)."""
    sizes = []
    for index in range(num_shards):
        name = schema.shard_name(split, index, num_shards)
        path = os.path.join(staging, name)
        if not os.path.isfile(path):
            raise records_read.MakeRecordsError(
                f"the Beam pipeline finished without writing shard {name}: do the workers "
                f"write into {fileio.show(staging)} at that path?", refused=True)
        sizes.append(os.path.getsize(path))
    return recordio.split_entry(split, n, sizes)
