"""make_records: turn a folder of upright images into sharded TFRecords.

    make_records --src photos/                      # writes records/photos/
    make_records --src photos/ --out /data/rec --max_side 384 --workers 8
    make_records --src photos/ --num_shards 16      # >= the number of training workers
    make_records --src photos/ --runner beam --beam_pipeline_options="--direct_num_workers=2"

Walks --src recursively and writes --out/train.tfrecord-NNNNN-of-NNNNN,
--out/val.tfrecord-... and --out/info.json (written last). Every image is
stored as a person sees it: EXIF orientation applied, 8-bit RGB (transparency
on white), longest side at most --max_side, JPEG at --jpeg_quality; RGB JPEGs
that need no change are stored byte for byte. Exact duplicates are stored once,
near-duplicates share one split, and the split of an image never changes when
images are added. Files that cannot be read are skipped and listed with their
reason in the summary and in info.json.

Exit status: 0 done; 1 the run was refused (too many skipped files, an empty
split, no images, OUT in use); 2 bad arguments or folders. Nothing a reader
accepts is left behind by a refused or killed run.
"""
import os
import shlex
import sys

from absl import app
from absl import flags

from upright import tools

_SRC = flags.DEFINE_string("src", None, "Folder of upright images, searched recursively.")
_OUT = flags.DEFINE_string(
    "out", None, "Records folder to write. Default: records/<name of --src>/ "
    "(relative to the current folder). Must not be inside --src.")
_VAL_FRACTION = flags.DEFINE_float(
    "val_fraction", 0.2, "Share of pictures in the val split, in (0, 1]; 1 makes an evaluation-only "
    "folder (a held-out set, no train split). Chosen by a "
    "stable hash of each file's bytes, so adding images never moves old ones.")
_MAX_SIDE = flags.DEFINE_integer(
    "max_side", 512, "Longest side of stored images in pixels; larger images are "
    "downscaled (aspect kept, LANCZOS). 0 keeps every image at its own size.")
_JPEG_QUALITY = flags.DEFINE_integer(
    "jpeg_quality", 95, "JPEG quality (1-100) of images that are re-encoded.")
_WORKERS = flags.DEFINE_integer(
    "workers", None, "Reader processes. Default: all usable cores. 1 reads in this process.")
_OVERWRITE = flags.DEFINE_boolean(
    "overwrite", False, "Write into a non-empty --out that is not a make_records output "
    "(its other files are left alone). A previous make_records output is always replaced.")
_MAX_SKIPPED_FRACTION = flags.DEFINE_float(
    "max_skipped_fraction", 0.1, "Refuse (exit 1, write nothing) when more than this "
    "share of the image files cannot be read.")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels", 128_000_000, "Images whose header declares more pixels are skipped "
    "as decompression bombs, before any pixel is decoded.")
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar on stderr.")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 0, "Shards per split. 0: by size (100-200 MB each). Multi-worker "
    "training and tf.data service read whole shard files per input pipeline, so write "
    "at least as many shards as pipelines (a multiple of their number balances them).",
    lower_bound=0)
_RUNNER = flags.DEFINE_enum(
    "runner", "local", ["local", "beam"], "local: reader processes on this machine. "
    "beam: Apache Beam workers read the images and write the shards, this machine plans on "
    "their metadata (pip install 'upright-orientation[beam]'); same records as local. The "
    "workers must see --src, --out and the work folder at the same paths (BUILD.md, "
    "section 8); choose the Beam runner with --beam_pipeline_options.")
_GROUP_BY = flags.DEFINE_string(
    "group_by", None, "Regular expression searched in each path relative to --src; images "
    "whose paths give the same key (the first capture group, or the whole match) land in "
    "the same split, so validation measures unseen pictures. E.g. '^(.*)_[0-9]+[.]jpg$' "
    "for crops named <picture>_<n>.jpg, '^[^/]+' for one folder per subject. Exact and "
    "near-duplicates are always kept together, with or without it.")
_NEAR_DUPLICATE_THRESHOLD = flags.DEFINE_float(
    "near_duplicate_threshold", 4.0, "Grey levels (0-255) of RMS difference between two "
    "images' 16x16 thumbnails at or below which they are the same picture (re-encoded or "
    "resized) and share a split; contrasty pictures get proportionally more (x std/20 above "
    "std 20). Groups merge transitively: lower it when pictures that differ little by design "
    "(form pages, product shots on white) chain into one group; 0 turns near-duplicate "
    "grouping off (exact duplicates are still stored once).", lower_bound=0)
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_pipeline_options", "", "With --runner=beam: Beam pipeline options, space-separated, "
    "e.g. \"--runner=FlinkRunner --flink_master=host:8081 --environment_type=LOOPBACK\". "
    "Default: DirectRunner on this machine. make_records' own option among them: "
    "--make_records_temp=<folder the workers share> for the stored images between the "
    "two passes (default: under --temp_location when it is a path, else the system temp "
    "folder).")


def default_out(src: str) -> str:
    """records/<name of src>, the name taken after resolving '.' and trailing slashes."""
    name = os.path.basename(os.path.normpath(os.path.abspath(src)))
    return os.path.join("records", name or "root")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --src DIR [--out DIR]")
    # TensorFlow is imported only to write the shards; keep its start-up chatter
    # out of the progress bar unless the user asked for it.
    from upright.pipeline import records
    out = _OUT.value or default_out(_SRC.value)
    arguments = {"src": _SRC.value, "out": out, "val_fraction": _VAL_FRACTION.value,
                 "max_side": _MAX_SIDE.value, "jpeg_quality": _JPEG_QUALITY.value,
                 "workers": _WORKERS.value, "overwrite": _OVERWRITE.value,
                 "max_skipped_fraction": _MAX_SKIPPED_FRACTION.value,
                 "max_pixels": _MAX_PIXELS.value, "num_shards": _NUM_SHARDS.value,
                 "runner": _RUNNER.value, "group_by": _GROUP_BY.value,
                 "near_duplicate_threshold": _NEAR_DUPLICATE_THRESHOLD.value}
    beam_options = shlex.split(_BEAM_OPTIONS.value)
    if beam_options and _RUNNER.value != "beam":
        raise app.UsageError("--beam_pipeline_options needs --runner=beam")
    try:
        info = records.make_records(
            src=_SRC.value, out=out, val_fraction=_VAL_FRACTION.value,
            max_side=_MAX_SIDE.value, jpeg_quality=_JPEG_QUALITY.value,
            workers=_WORKERS.value, overwrite=_OVERWRITE.value,
            max_skipped_fraction=_MAX_SKIPPED_FRACTION.value, max_pixels=_MAX_PIXELS.value,
            progress=_PROGRESS.value, arguments=arguments, num_shards=_NUM_SHARDS.value,
            runner=_RUNNER.value, beam_options=beam_options, group_by=_GROUP_BY.value,
            near_duplicate_threshold=_NEAR_DUPLICATE_THRESHOLD.value)
    except KeyboardInterrupt:
        print(f"make_records: interrupted; {out} holds its previous output or none that "
              "a reader accepts; run again to finish", file=sys.stderr)
        sys.exit(130)
    except records.MakeRecordsError as e:
        for line in e.details[:50]:
            print(line, file=sys.stderr)
        if len(e.details) > 50:
            print(f"  ... and {len(e.details) - 50} more", file=sys.stderr)
        print(f"make_records: error: {e}", file=sys.stderr)
        sys.exit(1 if e.refused else 2)
    print(records.format_summary(info))
    print(f"records in {out}")


def run():
    flags.mark_flag_as_required("src")
    tools.run_tool(main, __name__, tensorflow=False)


if __name__ == "__main__":
    run()
