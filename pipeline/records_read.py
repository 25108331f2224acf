"""Reading one source file for make_records: the per-image work both runners share.

records.make_records maps `read_one` over its reader processes (local runner)
or over Beam workers (records_beam.py); `spool_result` moves each result's
stored bytes to the local runner's scratch file, and `encode_stored` turns a
result and its stored bytes into the serialized example both runners write.
Kept apart from records.py so that records_beam.py needs nothing from it (no
import cycle).
"""
import dataclasses
import os

from upright.pipeline import fileio, imageio, schema


class MakeRecordsError(ValueError):
    """make_records refused: bad arguments or a result that cannot be trusted.

    `details`: extra lines (e.g. the skipped files) for the tool to print first.
    `refused`: True when the arguments were fine but the data cannot be trusted
    or OUT is in use (the tool exits 1), False for bad arguments or folders (2).
    """

    def __init__(self, message, details=(), refused=False):
        super().__init__(message)
        self.details = list(details)
        self.refused = refused


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """Per-image settings passed to the worker processes (see imageio.read_upright)."""
    max_side: int = imageio.DEFAULT_MAX_SIDE
    jpeg_quality: int = imageio.DEFAULT_JPEG_QUALITY
    max_pixels: int = imageio.DEFAULT_MAX_PIXELS


@dataclasses.dataclass
class _Result:
    """What a worker sends back for one file (the image bytes go separately)."""
    rel: bytes                 # path relative to SRC
    status: str                # "ok" | "skipped" | "ignored"
    reason: str = ""
    sha256: str = ""
    image: imageio.StoredImage = None


# ---------------------------------------------------------------- reading


def read_one(rel: bytes, *, src_b: bytes, options: ReadOptions) -> _Result:
    """Reads one file (runs in a worker process); never raises for bad files."""
    path = os.path.join(src_b, rel)
    ext = os.path.splitext(rel)[1].decode("utf-8", "replace").lower()
    known = ext in imageio.IMAGE_EXTENSIONS or ext in imageio.UNSUPPORTED_EXTENSIONS
    try:
        if not known and not _looks_like_image(path):
            return _Result(rel, "ignored", f"not an image file ({ext or 'no extension'})")
        data = imageio.read_bytes(path)
        stored = imageio.read_upright(path, data=data, max_side=options.max_side,
                                      jpeg_quality=options.jpeg_quality,
                                      max_pixels=options.max_pixels)
    except imageio.SkipImage as e:
        return _Result(rel, "skipped", str(e))
    except Exception as e:  # a reader bug must not kill the whole run: report it
        return _Result(rel, "skipped", f"unreadable: {type(e).__name__}: {e}"[:200])
    return _Result(rel, "ok", sha256=imageio.sha256_hex(data), image=stored)


def _looks_like_image(path) -> bool:
    """Header check for files whose extension is not an image extension."""
    import warnings
    from PIL import Image
    try:
        # Opened without blocking and only if regular (the name may have been
        # swapped for a FIFO since the walk); Pillow reads the header from it.
        with os.fdopen(fileio.open_regular(path), "rb") as f:
            if not f.read(1):
                return False
            f.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(f):
                    return True
    except Image.DecompressionBombError:
        return True    # an image: read_upright reports it as a bomb
    except Exception:
        return False


def spool_result(result, scratch, spans: dict):
    """Moves a read result's stored bytes to the scratch file; returns the result.

    Keeps memory flat: only (offset, length) stays in `spans[result.rel]`, and
    the result's image keeps its metadata with `encoded=b""`. Shared by the
    local and the Beam runner.
    """
    if result.status == "ok":
        data = result.image.encoded
        spans[result.rel] = (scratch.tell(), len(data))
        scratch.write(data)
        result.image = dataclasses.replace(result.image, encoded=b"")
    return result


def encode_stored(result, encoded: bytes) -> bytes:
    """The serialized tf.train.Example of one stored image (both runners' shards).

    Args:
      result: an "ok" _Result; its image's metadata is used, not its `encoded`
        (emptied once the bytes went to the scratch file or the Beam store).
      encoded: the stored JPEG bytes.
    """
    return schema.encode_example(schema.Record(
        encoded=encoded, format=result.image.format, height=result.image.height,
        width=result.image.width, source_id=result.rel.decode("utf-8", "surrogateescape"),
        sha256=result.sha256))
