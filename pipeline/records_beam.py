"""make_records on Apache Beam: the per-image work of records.make_records, scaled out.

    records.make_records(src="photos/", out="records/photos", runner="beam",
                         beam_options=["--runner=DirectRunner", "--direct_num_workers=2"])
    make_records --src photos/ --runner beam --beam_pipeline_options="--direct_num_workers=2"

What runs where:
  * on Beam: `records_read.read_one` for every file -- the SAME function the local
    mode maps over its reader processes (read as a person sees it, EXIF, modes,
    bombs, resize, re-encode, sha256, near-duplicate signature). This is the
    expensive part: it decodes every source image at full resolution.
  * here, after the Beam pipeline: the walk of SRC (before it), then the plan
    (exact duplicates, near-duplicate groups, stable-hash splits, refusals) and
    the shards + info.json, by the same code as local mode. The plan needs every
    image's 768-byte signature in one place (near-duplicate grouping compares
    all pairs), and the stored images come back through files in the temp
    location, so the records are byte-identical to a local run's.

Requirements on the runner: its workers read SRC at the same path (DirectRunner;
Flink or Spark with SRC on a shared filesystem) and reach the temp location. The
file list goes to the workers through a text file in the temp location (not
through beam.Create, which would embed millions of paths in the job graph);
results come back as pickled records in TFRecord files there. Default temp
location: a fresh folder under the system temp folder (fine for DirectRunner and
single-host Flink/Spark); for a cluster pass `--temp_location=<shared folder>`
among the pipeline options. Paths the workers see are read with plain Python
file calls, so an object store (gs://, s3://) must be mounted as a filesystem.
"""
import functools
import os
import pickle
import tempfile
import uuid

from upright.pipeline import fileio, records_read

_LIST_FILE = "files.txt"
_RESULTS_PREFIX = "results"


def read_all(src_b: bytes, files: list, options, scratch, *, out_b: bytes,
             beam_options=None, progress: bool = True):
    """Runs records_read.read_one over `files` on Beam; same return as records._read_all.

    Args:
      src_b: SRC as a bytes path.
      files: relative bytes paths (records.find_files().files).
      options: records_read.ReadOptions.
      scratch: open binary file; stored image bytes are appended to it.
      out_b: OUT (unused by the workers; kept for messages).
      beam_options: list of Beam pipeline option strings; [] -> DirectRunner.
      progress: unused (Beam runners report their own progress).
    Returns:
      (results sorted by path, {rel: (offset, length) in scratch}).
    Raises:
      records_read.MakeRecordsError: Beam is not installed, or the pipeline failed.
    """
    del out_b, progress
    try:
        import apache_beam as beam
        from apache_beam.options import pipeline_options
    except ImportError:
        raise records_read.MakeRecordsError(
            "--runner=beam needs Apache Beam: pip install 'upright-orientation[beam]' "
            "(or pip install 'apache-beam[tfrecord]>=2.60,<3')") from None
    opts = pipeline_options.PipelineOptions(list(beam_options or []))
    temp_location = opts.view_as(pipeline_options.GoogleCloudOptions).temp_location
    own_temp = not temp_location
    temp = (tempfile.mkdtemp(prefix="make_records_beam_") if own_temp
            else os.path.join(temp_location, f"make_records-{uuid.uuid4().hex}"))
    try:
        os.makedirs(temp, exist_ok=True)
        list_path = os.path.join(temp, _LIST_FILE)
        with os.fdopen(fileio.create_file(list_path), "w", encoding="ascii") as f:
            # Hex: file names are arbitrary bytes, the text source reads lines.
            f.writelines(rel.hex() + "\n" for rel in files)
        prefix = os.path.join(temp, _RESULTS_PREFIX)
        task = functools.partial(records_read.read_one, src_b=src_b, options=options)
        try:
            with beam.Pipeline(options=opts) as p:
                _ = (p
                     | "ListFiles" >> beam.io.ReadFromText(list_path)
                     | "Decode" >> beam.Map(bytes.fromhex)
                     # One text file is one bundle: redistribute so that every
                     # worker gets files to read.
                     | "Spread" >> beam.Reshuffle()
                     | "ReadOne" >> beam.Map(task)
                     | "Serialize" >> beam.Map(pickle.dumps)
                     | "Write" >> beam.io.WriteToTFRecord(
                         prefix, coder=beam.coders.BytesCoder()))
        except records_read.MakeRecordsError:
            raise
        except Exception as e:  # runner errors arrive as many types; say which
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise records_read.MakeRecordsError(
                f"the Beam pipeline failed: {type(e).__name__}: {message}"[:300],
                refused=True) from e
        results, spans = collect_results(prefix, scratch)
    finally:
        fileio.remove_tree(temp, ignore_errors=True)
    if len(results) != len(files):
        raise records_read.MakeRecordsError(
            f"the Beam pipeline returned {len(results)} results for {len(files)} files",
            refused=True)
    return results, spans


def collect_results(prefix: str, scratch):
    """Reads the pickled read_one results back; spills stored images to scratch.

    Same bookkeeping as the local runner (records_read.spool_result).
    """
    import glob
    import tensorflow as tf
    paths = sorted(glob.glob(glob.escape(prefix) + "*"))
    results, spans = [], {}
    for serialized in tf.data.TFRecordDataset(paths):
        results.append(records_read.spool_result(pickle.loads(serialized.numpy()), scratch, spans))
    results.sort(key=lambda r: r.rel)
    return results, spans
