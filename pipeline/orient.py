"""Using a trained model on real files: predict each image's rotation, report it,
and (optionally) write upright copies.

    from upright.pipeline import orient
    result = orient.run(orient.OrientConfig(model_dir="runs/demo", paths=("photos/",),
                                            fix=True, dst="fixed/"))

What happens to each file (files, or folders walked recursively):
1. It is read as a person sees it -- EXIF orientation applied -- as make_records
   reads sources, and framed and resized as training preprocessed its records
   (serve.Predictor.read_images): for a squash model straight from the file
   (`imageio.open_for_model`: JPEGs decoded at reduced DCT scale, no stored
   copy; `workers` threads), otherwise through make_records' stored copy
   (`imageio.read_upright`) and `preprocess.preprocess_image`. Unreadable,
   corrupt or unsupported files get status "error" with the reason and are
   skipped; nothing stops the run.
2. The model gives k (the image as seen is turned k quarter turns counter-
   clockwise) and a confidence (max probability). The action:
     "unsure"  confidence < min_confidence: left alone, listed in the summary
               (a wrong turn is worse than none);
     "none"    k = 0: already upright as seen;
     "turn"    k != 0: turn it k quarter turns clockwise (repair_cw = 90 k degrees).
   exif_disagrees is True when the file has an EXIF Orientation tag (any value,
   1 included) and the model confidently says the image as that tag shows it is
   not upright: the tag and the pixels disagree.
3. With fix=True, "turn" images are written to DST (same relative path and file
   name), upright, with their metadata (EXIF, ICC profile, XMP, comments) and the
   EXIF Orientation tag set to 1: how, and when losslessly, is
   pipeline/upright_copy.py's docstring; the report's "method" column says which.
   A manifest DST/.orient_done.jsonl records every written file (source
   sha256, destination sha256): a rerun skips a file whose destination exists
   and matches its record (status "done"). A file already in DST is replaced
   only for the source it was written for: another run's copy with the same
   relative name (or a file orient did not write) is left as it is, and the
   row says so (status "error").
PDF files (pipeline/pdf.py) are read page by page: each page is rendered as a
viewer shows it and predicted like an image, one report row per page
("scan.pdf#page=3"). With fix, a PDF with at least one page to turn is written
to DST (same relative path) with those pages' /Rotate corrected, as an
incremental update: the original bytes, content streams included, are kept
unchanged. Unsure pages keep their /Rotate and are listed. Encrypted, damaged
and over-long (max_pdf_pages) PDFs get one error row each and nothing written.
Sources are never modified.
"""
import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys

import numpy as np

from upright.pipeline import fileio, imageio, schema, upright_copy

MANIFEST = ".orient_done.jsonl"
DEFAULT_MIN_CONFIDENCE = 0.9
PROGRESS_MIN_FILES = 20

REPORT_FIELDS = ("path", "status", "action", "predicted", "angle_ccw", "repair_cw",
                 "confidence", "p_0", "p_90", "p_180", "p_270", "exif_orientation",
                 "exif_disagrees", "dst", "method", "message")


@dataclasses.dataclass(frozen=True)
class OrientConfig:
    """What `run` does.

    model_dir: trainer model_dir, SavedModel export or TFLite-only folder
      (serve.load_model_dir), or the name of a built-in model ("documents",
      pipeline/builtin.py) when no folder of that name exists.
    paths: files and folders (folders walked recursively; hidden entries skipped).
    fix: write upright copies of "turn" images into dst.
    dst: output folder for fix (must not be one of the source folders).
    min_confidence: below it an image is left alone ("unsure"); in [0, 1].
    report: write a report to this path, .csv or .json (by extension).
    batch_size: images per model call.
    lossless: use jpegtran for JPEG when it is installed (jpegtran: its path or
      name on PATH); False always re-encodes.
    jpeg_quality: quality of re-encoded JPEGs (1..100).
    trim_edges: when jpegtran -perfect refuses (the size is not a whole number
      of coding blocks on an edge the turn moves), turn losslessly anyway with
      -trim, dropping the partial edge blocks (at most upright_copy.MAX_TRIM = 15 pixel
      columns at the copy's left edge and rows at its top, the method says how
      many); False keeps every pixel by re-encoding such a JPEG.
    max_side: longest side the image is reduced to before preprocessing, as
      make_records stores it (imageio.DEFAULT_MAX_SIDE).
    progress: tqdm bar; None = when there are >= PROGRESS_MIN_FILES files.
    max_pdf_pages: a PDF with more pages is not processed (one error line).
    models_dir: where built-in models are looked up (builtin.lookup_dir);
      None = $UPRIGHT_MODELS_DIR or the package's own upright/models/.
    trust_model: load a SavedModel without scanning its ops for file, network
      and Python ops (serve.load_model_dir); only for models from people you trust.
    tta: predict every image in its four quarter turns and combine them
      (evaluation.combine_rotations: the shifted-back log-probabilities
      averaged); 4x the model's work. A model with a bias towards one turn
      (upside-down pages read as upright) loses it: on the held-out document
      pages it took accuracy from 0.91 to 1.00 (benchmarks/README.md,
      "Accuracy on real sets").
    workers: threads that decode images side by side, and one-thread TFLite
      interpreters that predict side by side (serve.load_model); 0 = the CPU
      cores this process may use (at most MAX_WORKERS).
    """
    model_dir: str
    paths: tuple
    fix: bool = False
    dst: str = None
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    report: str = None
    batch_size: int = 32
    lossless: bool = True
    jpegtran: str = "jpegtran"
    jpeg_quality: int = 95
    trim_edges: bool = True
    max_side: int = imageio.DEFAULT_MAX_SIDE
    progress: bool = None
    models_dir: str = None
    max_pdf_pages: int = 2000
    trust_model: bool = False
    tta: bool = False
    workers: int = 0


# workers=0 uses the cores this process may use, up to this many.
MAX_WORKERS = 8


def default_workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class OrientError(ValueError):
    """Bad configuration (one line, before any work)."""


# ---------------------------------------------------------------------------
# Files.

def list_images(paths, exclude=None, skipped=None) -> list:
    """[(path, relative destination name)] for files and folders, recursively.

    Folders: files whose extension is an image format (imageio.IMAGE_EXTENSIONS,
    or a known unsupported one, which is then reported), hidden files and folders
    skipped, sorted; their relative name is the path under the folder. Files
    named explicitly are always included, relative name = base name.
    exclude: a folder whose contents are never listed (the fix destination).
    skipped: a list that receives (folder, reason) for folders not walked
      (nested deeper than fileio.MAX_FOLDER_DEPTH).
    Raises OrientError for a path that does not exist.
    """
    exclude = os.path.realpath(exclude) if exclude else None
    known = imageio.IMAGE_EXTENSIONS | imageio.UNSUPPORTED_EXTENSIONS
    out = []
    for path in paths:
        if os.path.isfile(path):
            out.append((path, os.path.basename(path)))
        elif os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                if exclude and _inside(os.path.realpath(root), exclude):
                    dirs[:] = []
                    continue
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                depth = os.path.relpath(root, path).count(os.sep) + (root != path)
                if depth >= fileio.MAX_FOLDER_DEPTH and dirs:
                    # os.walk recurses: a planted chain of folders would end in
                    # RecursionError; deeper folders are reported, not walked.
                    if skipped is not None:
                        skipped.extend((os.path.join(root, d), "folder nested deeper than "
                                        f"{fileio.MAX_FOLDER_DEPTH} levels: not read")
                                       for d in dirs)
                    dirs[:] = []
                for name in sorted(names):
                    if name.startswith(".") or os.path.splitext(name)[1].lower() not in known:
                        continue
                    full = os.path.join(root, name)
                    out.append((full, os.path.relpath(full, path)))
        else:
            raise OrientError(f"{path}: no such file or folder")
    return out


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def sha256_file(path) -> str:
    """Digest of a copy orient wrote into DST: a link or a FIFO planted there in
    its place is refused (OSError), never followed or waited on."""
    digest = hashlib.sha256()
    with os.fdopen(fileio.open_regular(path, follow=False), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(dst) -> dict:
    """{source realpath: record} from DST/.orient_done.jsonl (bad lines ignored)."""
    records = {}
    path = os.path.join(dst, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                    records[record["src"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that file is simply redone
    return records


def is_done(record, src_sha, dst_path) -> bool:
    if record is None or record.get("src_sha256") != src_sha or not os.path.lexists(dst_path):
        return False
    try:
        return sha256_file(dst_path) == record.get("dst_sha256")
    except OSError:   # a link or a FIFO in place of the copy: written again (replaced)
        return False


# ---------------------------------------------------------------------------
# Writing upright copies.

def jpegtran_path(config: OrientConfig):
    """The jpegtran executable to use, or None (lossless off or not installed)."""
    if not config.lossless or not config.jpegtran:
        return None
    return shutil.which(config.jpegtran)


def write_upright(data: bytes, dst_path: str, transform: str, *, config: OrientConfig,
                  jpegtran) -> str:
    """Writes the upright copy (upright_copy.turn) atomically; returns its method."""
    payload, method = upright_copy.turn(data, transform, jpegtran=jpegtran,
                                        trim_edges=config.trim_edges,
                                        jpeg_quality=config.jpeg_quality)
    _write_into_dst(payload, dst_path, config)
    return method


def _write_into_dst(payload: bytes, dst_path: str, config: OrientConfig) -> None:
    """Writes `payload` as dst_path, a path under config.dst.

    DST's subfolders are opened one by one without following links (one
    planted there would carry the copy out of DST); the file lands whole
    through an unguessable temporary name and a rename (fileio), never
    half-written. Not fsynced: the manifest line comes after it and a lost
    copy is simply redone.
    """
    folder, name = os.path.split(os.path.abspath(dst_path))
    dir_fd = fileio.open_dirs(config.dst, os.path.relpath(folder, os.path.abspath(config.dst)))
    try:
        fileio.write_bytes(name, payload, dir_fd=dir_fd, durable=False)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------
# The run.

def predict(predictor, images, config: OrientConfig) -> np.ndarray:
    """Probabilities [N, 4] for preprocessed images [N, S, S, 3]; with config.tta,
    combined over the images' four quarter turns (preprocessing commutes with
    rot90, so turning the preprocessed square is turning the file)."""
    if not config.tta:
        return predictor.predict_images(images, batch_size=config.batch_size)
    from upright.pipeline import evaluation
    by_turn = [predictor.predict_images(np.ascontiguousarray(np.rot90(images, j, axes=(1, 2))),
                                        batch_size=config.batch_size)
               for j in range(schema.NUM_CLASSES)]
    return evaluation.combine_rotations(by_turn)[0]


def decide(probs, min_confidence: float, exif_orientation) -> dict:
    """Row fields from one probability vector [4]."""
    probs = np.asarray(probs, np.float64)
    k = int(np.argmax(probs))
    confidence = float(probs[k])
    sure = confidence >= min_confidence
    action = "unsure" if not sure else ("none" if k == 0 else "turn")
    row = {"action": action, "predicted": schema.CLASS_NAMES[k],
           "angle_ccw": schema.ANGLES_CCW[k], "repair_cw": schema.ANGLES_CCW[k],
           "confidence": round(confidence, 6),
           "exif_orientation": exif_orientation,
           "exif_disagrees": bool(exif_orientation is not None and sure and k != 0)}
    for name, p in zip(schema.CLASS_NAMES, probs):
        row[f"p_{name}"] = round(float(p), 6)
    return row


def run(config: OrientConfig, predictor=None) -> dict:
    """Predicts (and with fix, repairs) every image; writes the report.

    Returns:
      {"rows": [dict with REPORT_FIELDS], "summary": {...}, "report": path or None}.
    Raises:
      OrientError for a bad configuration (before any file is touched).
    """
    check_config(config)
    not_walked = []
    files = list_images(config.paths, exclude=config.dst if config.fix else None,
                        skipped=not_walked)
    if predictor is None:
        from upright.pipeline import serve
        try:
            predictor = serve.load_model(config.model_dir, models_dir=config.models_dir,
                                         trust_model=config.trust_model,
                                         workers=config.workers or default_workers())
        except serve.ModelDirError as e:
            raise OrientError(str(e)) from None
    jpegtran = jpegtran_path(config) if config.fix else None
    manifest = load_manifest(config.dst) if config.fix else {}
    rows, taken, batch = [_error_row(folder, reason) for folder, reason in not_walked], {}, []
    # Who each existing copy in DST was written for (earlier runs, any source):
    # a copy is only ever replaced for the source it was written for.
    owners = {record.get("dst"): src for src, record in manifest.items()}
    progress = _progress(len(files), config.progress)

    def flush():
        rows.extend(_process_batch(batch, predictor, config, jpegtran, manifest, taken,
                                   owners))
        progress.update(len(batch))
        batch.clear()

    # Images go in batches; a PDF is one unit (all its pages, one output file).
    # Rows keep the order of the files.
    for path, rel in files:
        if is_pdf(path):
            if batch:
                flush()
            rows.extend(_process_pdf(path, rel, predictor, config, manifest, taken))
            progress.update(1)
            continue
        batch.append((path, rel))
        if len(batch) == config.batch_size:
            flush()
    if batch:
        flush()
    progress.close()
    summary = summarize(rows, config, jpegtran)
    if config.report:
        write_report(rows, summary, config.report)
    return {"rows": rows, "summary": summary, "report": config.report}


def orient_images(paths, *, model: str = "documents",
                  min_confidence: float = DEFAULT_MIN_CONFIDENCE, batch_size: int = 32,
                  models_dir: str = None, predictor=None, tta: bool = False,
                  max_side: int = imageio.DEFAULT_MAX_SIDE) -> list:
    """Predicts the orientation of image files (and PDF pages); writes nothing.

    Args:
      paths: files or folders (walked recursively), as for `run`.
      model: a model folder or a built-in model name (see OrientConfig.model_dir).
      min_confidence: below it an image is left alone (turn 0, left_alone True).
      models_dir: override of the built-in models folder (builtin.lookup_dir).
      predictor: an already loaded serve.Predictor (then `model` is not loaded).
      tta: combine each image's four quarter turns (OrientConfig.tta).
      max_side: OrientConfig.max_side.
    Returns:
      One dict per image (PDF: per page, path "FILE#page=N"), in input order:
        path; angle_ccw (int degrees the image is turned counter-clockwise, or
        None on error); confidence (float in [0.25, 1], or None); turn_cw (int
        degrees to turn it clockwise to repair it: 0 when upright or left
        alone); left_alone (True when confidence < min_confidence); action
        ("turn", "none", "unsure", "skip"); probabilities ({"0": p, "90": ...});
        error (None, or why the file could not be read).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    config = OrientConfig(model_dir=model, paths=tuple(os.fspath(p) for p in paths),
                          min_confidence=min_confidence, batch_size=batch_size,
                          progress=False, models_dir=models_dir, tta=tta,
                          max_side=max_side)
    out = []
    for row in run(config, predictor=predictor)["rows"]:
        ok = row["status"] != "error" and row["angle_ccw"] is not None
        out.append({
            "path": row["path"],
            "angle_ccw": row["angle_ccw"] if ok else None,
            "confidence": row["confidence"] if ok else None,
            "turn_cw": row["repair_cw"] if ok and row["action"] == "turn" else 0,
            "left_alone": row["action"] == "unsure",
            "action": row["action"],
            "probabilities": ({name: row[f"p_{name}"] for name in schema.CLASS_NAMES}
                              if ok else None),
            "error": row["message"] if row["status"] == "error" else None,
        })
    return out


def check_config(config: OrientConfig) -> None:
    if not config.paths:
        raise OrientError("no files or folders given")
    if not 0.0 <= config.min_confidence <= 1.0:
        raise OrientError(f"min_confidence must be in [0, 1], got {config.min_confidence}")
    if config.fix and not config.dst:
        raise OrientError("fix needs a destination folder (--dst): sources are never modified")
    if config.fix:
        dst = os.path.realpath(config.dst)
        for path in config.paths:
            real = os.path.realpath(path)
            if os.path.isdir(path) and real == dst:
                raise OrientError(f"--dst {config.dst} is the source folder {path}; "
                                  "choose another folder (sources are never modified)")
        manifest = os.path.join(config.dst, MANIFEST)
        if os.path.lexists(manifest) and (os.path.islink(manifest)
                                          or not os.path.isfile(manifest)):
            raise OrientError(f"{manifest} is a link or not a regular file; orient keeps "
                              "its own record of written copies there: remove it and run again")
    if config.report and os.path.splitext(config.report)[1].lower() not in (".csv", ".json"):
        raise OrientError(f"report {config.report!r} must end in .csv or .json")
    if config.workers < 0:
        raise OrientError(f"workers must be >= 0, got {config.workers}")
    if not 1 <= config.jpeg_quality <= 100:
        raise OrientError(f"jpeg_quality must be in 1..100, got {config.jpeg_quality}")


def _error_row(path, message) -> dict:
    row = {field: None for field in REPORT_FIELDS}
    row.update(path=path, status="error", action="skip", exif_disagrees=False,
               message=message)
    return row


def _process_batch(batch, predictor, config, jpegtran, manifest, taken, owners):
    rows, reading, ready = [], [], []   # ready: (row, data, preprocessed image, dst)
    for path, rel in batch:
        row = {field: None for field in REPORT_FIELDS}
        row.update(path=path, status="ok", exif_disagrees=False)
        rows.append(row)
        dst_path = os.path.join(config.dst, rel) if config.fix else None
        try:
            data = imageio.read_bytes(path)
            if config.fix:
                key = os.path.realpath(path)
                record = manifest.get(key)
                if is_done(record, hashlib.sha256(data).hexdigest(), dst_path):
                    row.update({k: record.get(k) for k in ("predicted", "angle_ccw",
                                                            "repair_cw", "confidence",
                                                            "method", "exif_orientation")})
                    row.update(status="done", action="turn", dst=dst_path,
                               message="already written by an earlier run")
                    continue
            reading.append((row, data, dst_path))
        except imageio.SkipImage as e:
            row.update(status="error", action="skip", message=str(e))
    # Decoded side by side on the predictor's threads.
    read = predictor.read_images([(row["path"], data) for row, data, _ in reading],
                                 config.max_side)
    for (row, data, dst_path), result in zip(reading, read):
        try:
            if isinstance(result, BaseException):
                raise result
            # The orientation the reader found: reading it again from a PNG
            # would decode the whole image once more (Pillow looks for eXIf
            # after the pixel data).
            image, notes, row["exif_orientation"] = result
            # What the reader found and ignored (a damaged EXIF block): this
            # file's note, never a warning on stderr through the progress bar.
            found = [n for n in notes if n == imageio.CORRUPT_EXIF_NOTE
                     or n.startswith("Pillow warning")]
            if found:
                row["message"] = "; ".join(found)
            ready.append((row, data, image, dst_path))
        except imageio.SkipImage as e:
            row.update(status="error", action="skip", message=str(e))
        except Exception as e:  # a decoder error TensorFlow raises on a bad file
            row.update(status="error", action="skip",
                       message=f"corrupt: {type(e).__name__}: {_first_line(e)}")
    if not ready:
        return rows
    probs = predict(predictor, np.stack([image for _, _, image, _ in ready]), config)
    for (row, data, _, dst_path), p in zip(ready, probs):
        row.update(decide(p, config.min_confidence, row["exif_orientation"]))
        if config.fix and row["action"] == "turn":
            _fix_one(row, data, dst_path, config, jpegtran, manifest, taken, owners)
    return rows


def is_pdf(path) -> bool:
    return os.path.splitext(path)[1].lower() in (".pdf",)


def _process_pdf(path, rel, predictor, config, manifest, taken):
    """Rows for one PDF, one per page ("FILE#page=N"), or one error row for the
    file; with fix, writes DST/rel with the repaired pages' /Rotate (pipeline/pdf.py)
    when at least one page turns."""
    from upright.pipeline import pdf
    dst_path = os.path.join(config.dst, rel) if config.fix else None
    try:
        data = imageio.read_bytes(path)
    except imageio.SkipImage as e:
        return [_error_row(path, str(e))]
    src_sha = hashlib.sha256(data).hexdigest()
    if config.fix:
        record = manifest.get(os.path.realpath(path))
        if is_done(record, src_sha, dst_path) and record.get("pages"):
            return _pdf_rows_done(path, record, dst_path)
    try:
        document = pdf.open_pdf(data, max_pages=config.max_pdf_pages)
    except pdf.PdfError as e:
        return [_error_row(path, str(e))]
    except ImportError:
        return [_error_row(path, "PDF support is not installed: pip install "
                                 "'upright-orientation[pdf]' (pypdf, pypdfium2)")]
    try:
        rows, turns = _predict_pages(path, document, predictor, config)
    finally:
        document.close()
    if not (config.fix and turns):
        return rows
    turned = [r for r in rows if r["action"] == "turn" and r["status"] == "ok"]
    problem = _write_pdf(path, data, dst_path, {i: new for i, (_, new) in turns.items()},
                         config, taken)
    if problem:
        for row in turned:
            row.update(status="error", message=problem)
        return rows
    for row in turned:
        old, new = turns[_page_number(row) - 1]
        row.update(dst=dst_path, method=f"lossless (/Rotate {old} -> {new})")
    record = {"src": os.path.realpath(path), "src_sha256": src_sha,
              "dst": os.path.relpath(dst_path, config.dst), "dst_sha256": sha256_file(dst_path),
              "method": "pdf /Rotate (incremental update)",
              "pages": [{"page": _page_number(r),
                         **{k: r[k] for k in ("action", "predicted", "angle_ccw", "repair_cw",
                                              "confidence", "method")}}
                        for r in rows if r["status"] == "ok"]}
    _record(config, manifest, record, dst_path)
    return rows


def _page_row(path, index) -> dict:
    """A fresh report row (status "ok") for page `index` (0-based) of the PDF `path`."""
    row = {field: None for field in REPORT_FIELDS}
    row.update(path=f"{path}#page={index + 1}", status="ok", exif_disagrees=False)
    return row


def _page_number(row) -> int:
    """The 1-based page number of a page row ("scan.pdf#page=3" -> 3)."""
    return int(row["path"].rsplit("#page=", 1)[1])


def _pdf_rows_done(path, record, dst_path) -> list:
    """Rows (status "done") for a PDF an earlier run repaired: its manifest
    record's pages, as that run predicted them."""
    rows = []
    for page in record["pages"]:
        row = _page_row(path, page["page"] - 1)
        row.update({k: page.get(k) for k in ("predicted", "angle_ccw", "repair_cw",
                                             "confidence", "method")})
        row.update(status="done", action=page.get("action"), dst=dst_path,
                   message="already written by an earlier run")
        rows.append(row)
    return rows


def _predict_pages(path, document, predictor, config) -> tuple:
    """Renders, reads and predicts every page of an open PDF (pdf.open_pdf).

    -> (rows: one per page, in page order, decided (`decide`) or status "error"
    for a page that does not render; turns: {0-based page index: (current
    /Rotate, repaired /Rotate)} for the pages to turn, degrees in {0, 90, 180, 270}).
    Pages go batch_size at a time, so a long PDF never holds more than one
    batch of pixels.
    """
    from upright.pipeline import pdf
    rows, turns = [], {}
    for start in range(0, len(document), config.batch_size):
        ready = []   # (row, page index, current /Rotate, preprocessed image)
        for index in range(start, min(start + config.batch_size, len(document))):
            row = _page_row(path, index)
            rows.append(row)
            try:
                png, rotation = pdf.render_page(document, index, config.max_side)
                image, *_ = predictor.read_image(row["path"], png, config.max_side)
                ready.append((row, index, rotation, image))
            except Exception as e:  # one page that does not render: that page only
                row.update(status="error", action="skip", message=f"page not rendered: "
                           f"{type(e).__name__}: {_first_line(e)}")
        if not ready:
            continue
        probs = predict(predictor, np.stack([image for *_, image in ready]), config)
        for (row, index, rotation, _), p in zip(ready, probs):
            row.update(decide(p, config.min_confidence, None))
            if row["action"] == "turn":
                turns[index] = (rotation, (rotation + row["repair_cw"]) % 360)
    return rows, turns


def _write_pdf(path, data, dst_path, rotations, config, taken):
    """Writes DST's copy of the PDF `data` with /Rotate of page i set to
    rotations[i] (pdf.rotate_pages, an incremental update) and marks the
    destination taken by `path`. -> None, or why nothing was written (the
    destination is the source or already taken, or the update or the write
    failed: never fatal)."""
    from upright.pipeline import pdf
    real_dst = os.path.realpath(dst_path)
    if real_dst == os.path.realpath(path):
        return "destination is the source file; not written"
    if real_dst in taken:
        return f"destination {dst_path} already taken by {taken[real_dst]}"
    try:
        _write_into_dst(pdf.rotate_pages(data, rotations), dst_path, config)
    except Exception as e:  # never fatal: report and go on
        return f"not written: {type(e).__name__}: {_first_line(e)}"
    taken[real_dst] = path
    return None


def _fix_one(row, data, dst_path, config, jpegtran, manifest, taken, owners):
    real_dst = os.path.realpath(dst_path)
    if real_dst == os.path.realpath(row["path"]):
        row.update(status="error", message="destination is the source file; not written")
        return
    if real_dst in taken:
        row.update(status="error",
                   message=f"destination {dst_path} already taken by {taken[real_dst]}")
        return
    rel, src = os.path.relpath(dst_path, config.dst), os.path.realpath(row["path"])
    if os.path.lexists(dst_path) and owners.get(rel) != src:
        # Another run (another source folder with the same relative name), or
        # someone else, put this file there: never replaced silently.
        whose = (f"written by an earlier run for {fileio.show(owners[rel])}"
                 if rel in owners else "not written by orient")
        row.update(status="error", message=f"destination {fileio.show(dst_path)} exists "
                   f"({whose}); not overwritten: remove it or choose another --dst")
        return
    k = schema.ANGLES_CCW.index(row["angle_ccw"])
    transform = upright_copy.stored_to_upright(row["exif_orientation"], k)
    try:
        method = write_upright(data, dst_path, transform, config=config, jpegtran=jpegtran)
    except Exception as e:  # never fatal: report and go on
        row.update(status="error", message=f"not written: {type(e).__name__}: {_first_line(e)}")
        return
    taken[real_dst] = row["path"]
    row.update(dst=dst_path, method=method)
    record = {"src": os.path.realpath(row["path"]), "src_sha256": hashlib.sha256(data).hexdigest(),
              "dst": os.path.relpath(dst_path, config.dst), "dst_sha256": sha256_file(dst_path),
              "transform": transform, "method": method,
              **{k: row[k] for k in ("predicted", "angle_ccw", "repair_cw", "confidence",
                                     "exif_orientation")}}
    owners[record["dst"]] = record["src"]
    _record(config, manifest, record, dst_path)


def _record(config, manifest, record, dst_path):
    """Adds a written file's record to the manifest, in memory and as one JSON
    line in DST/MANIFEST, appended after the file is in place: a crash loses at
    most the record of the last file, which is then simply redone."""
    manifest[record["src"]] = record
    try:
        with fileio.open_append(os.path.join(config.dst, MANIFEST)) as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise OrientError(f"cannot record {fileio.show(dst_path)} in {MANIFEST}: "
                          f"{_first_line(e)}") from None


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def _progress(total, enabled):
    from tqdm import tqdm
    if enabled is None:
        # disable=None: tqdm shows the bar only on a terminal.
        disable = True if total < PROGRESS_MIN_FILES else None
    else:
        disable = not enabled
    return tqdm(total=total, unit="img", disable=disable, file=sys.stderr)


# ---------------------------------------------------------------------------
# Reporting.

def summarize(rows, config, jpegtran) -> dict:
    count = lambda **kw: sum(all(r.get(k) == v for k, v in kw.items()) for r in rows)  # noqa: E731
    return {
        "files": len(rows),
        "errors": count(status="error"),
        "upright": count(status="ok", action="none"),
        "turn": count(status="ok", action="turn"),
        "unsure": count(action="unsure"),
        "already_done": count(status="done"),
        "exif_disagrees": sum(bool(r["exif_disagrees"]) for r in rows),
        "corrupt_exif_ignored": sum(r["status"] != "error"
                                    and imageio.CORRUPT_EXIF_NOTE in (r["message"] or "")
                                    for r in rows),
        "written": sum(1 for r in rows if r["status"] == "ok" and r["dst"]),
        "lossless": sum(1 for r in rows if r["status"] == "ok" and r["method"]
                        and upright_copy.is_lossless(r["method"])),
        "lossless_trimmed": sum(1 for r in rows if r["status"] == "ok" and r["method"]
                                and r["method"].startswith("lossless (jpegtran), ")),
        "reencoded_jpeg": sum(1 for r in rows if r["status"] == "ok" and r["method"]
                              and r["method"].startswith("re-encoded (JPEG")),
        "lossless_requested": config.lossless,
        "min_confidence": config.min_confidence,
        "fix": config.fix,
        "jpegtran": jpegtran,
        "unsure_files": [r["path"] for r in rows if r["action"] == "unsure"],
        "error_files": [r["path"] for r in rows if r["status"] == "error"],
        "convention": schema.CONVENTION,
    }


def write_report(rows, summary, path) -> None:
    """CSV (one row per file, REPORT_FIELDS) or JSON ({"summary", "rows"})."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".json"):
        fileio.write_json(path, {"summary": summary, "rows": rows}, indent=2,
                          final_newline=False)
    else:
        with fileio.atomic_write(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: "" if row.get(k) is None else fileio.show(row[k])
                                 for k in REPORT_FIELDS})


def shorten_middle(text: str, width: int) -> str:
    """`text` cut to `width` characters in the middle ("photos/2019/.../img_0042.jpg"):
    the start says where a file is and the end which one it is."""
    if len(text) <= width:
        return text
    tail = (width - 3) // 2 + (width - 3) % 2
    return text[:width - 3 - tail] + "..." + text[-tail:]


def format_table(rows, width: int = 48) -> str:
    """One line per file: path, predicted rotation, confidence, action, notes."""
    lines = [f"{'file':<{width}}  {'turned':>6}  {'conf':>6}  {'action':<10}  notes"]
    for r in rows:
        path = fileio.show(r["path"])
        path = shorten_middle(path, width)
        turned = f"{r['angle_ccw']}" if r["angle_ccw"] is not None else "-"
        conf = f"{r['confidence']:.3f}" if r["confidence"] is not None else "-"
        action = r["action"] or "-"
        if r["status"] == "done":
            action = "done"
        elif action == "turn":
            action = f"turn {r['repair_cw']}cw"
        notes = []
        if r["exif_disagrees"]:
            notes.append(f"EXIF tag {r['exif_orientation']} disagrees")
        if r["method"]:
            notes.append(r["method"])
        if r["message"]:
            notes.append(fileio.show(r["message"]))
        lines.append(f"{path:<{width}}  {turned:>6}  {conf:>6}  {action:<10}  {'; '.join(notes)}")
    return "\n".join(lines)


def format_summary(summary) -> str:
    trimmed = (f", {summary['lossless_trimmed']} of them with a partial edge block trimmed"
               if summary.get("lossless_trimmed") else "")
    written = (f" (written: {summary['written']}, lossless: {summary['lossless']}{trimmed})"
               if summary["fix"] else "")
    lines = [f"{summary['files']} files: {summary['upright']} upright, {summary['turn']} to turn"
             f"{written}"
             f", {summary['unsure']} left alone (confidence < {summary['min_confidence']}), "
             f"{summary['errors']} errors, {summary['already_done']} already done; "
             f"{summary['exif_disagrees']} with an EXIF tag that disagrees"]
    if summary.get("corrupt_exif_ignored"):
        lines.append(f"{summary['corrupt_exif_ignored']} with corrupt EXIF data (ignored, as "
                     "viewers do: read as their pixels show; see the notes column)")
    lines.append("'turned' = degrees the image is turned counter-clockwise; "
                 "'turn Ncw' repairs it by N degrees clockwise")
    if summary["fix"] and summary["jpegtran"] is None and summary["reencoded_jpeg"]:
        lines.append(("JPEGs re-encoded (--nolossless)" if not summary["lossless_requested"]
                      else "jpegtran is not installed, so JPEGs were re-encoded (install "
                      "libjpeg-turbo-progs, e.g. apt-get install libjpeg-turbo-progs, "
                      "for lossless turns)"))
    for key, title in (("unsure_files", "left alone (unsure)"), ("error_files", "errors")):
        files = summary[key]
        if files:
            shown = [fileio.show(f) for f in files[:20]]
            lines.append(f"{title}: " + ", ".join(shown)
                         + (f" ... and {len(files) - 20} more (see the report)"
                            if len(files) > 20 else ""))
    return "\n".join(lines)
