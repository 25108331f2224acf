"""A model against Tesseract OSD on held-out upright pages, in one run.

    apt-get install tesseract-ocr tesseract-ocr-osd
    python benchmarks/bench_tesseract.py --pages /data/held_out_pages --model documents \
        --jobs 2 --format jpeg --out bench_tesseract.json

Every page image in --pages (upright, as a person reads it; folders walked
recursively) is turned into all four orientations, label k = k quarter turns
counter-clockwise (np.rot90(page, k), the project's convention), written to a
temporary folder as --format files (png: lossless, compress level 1; jpeg:
quality 95, as scans usually come), and each of the 4 x N files is given to:
  * the model (a model folder or a built-in name; serve.load_model with
    --jobs workers), through orient.orient_images -- the path `orient` takes:
    reading the file, decoding, the model's preprocessing, batches of
    --batch_size;
  * Tesseract OSD, `tesseract IMG - --psm 0`, --jobs processes at a time, each
    with OMP_THREAD_LIMIT=1. Its "Rotate: R" is the clockwise repair, so its
    answer is k = R / 90 (checked: a page turned 90 ccw gives "Rotate: 90").
    No "Rotate:" line (e.g. "Too few characters") = no answer.
Reported per system, side by side:
  accuracy          correct / all 4N (no answer counts as wrong);
  answered          share of the 4N images with an answer (the model: those with
                    confidence >= --min_confidence; the model's accuracy with
                    the threshold off is the "accuracy" line);
  answered_accuracy correct / answered;
  cpu_ms_per_image  CPU time per image: the model's process (all its threads),
                    or the tesseract processes; on cores shared with other
                    jobs the wall-clock pages/s depend on their load, this much
                    less;
  pages_per_s       4N / wall seconds, with --jobs cores (the model: --jobs
                    decoding threads and one-thread TFLite interpreters, its
                    TensorFlow threads limited to --jobs too), file reading,
                    decoding and preprocessing included;
  0-vs-180          upright pages answered 180 and upside-down pages answered 0
                    (the hard case for text), and the full 4 x 4 confusion.
Both systems read the same files, from a temporary folder, never from --pages.
The load average before and after each system's run goes into the JSON (the
cores may be shared).
"""
import argparse
import concurrent.futures
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROTATE = re.compile(r"^Rotate:\s*(\d+)\s*$", re.MULTILINE)
EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def list_pages(folder, num=None):
    out = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                 for name in names if name.lower().endswith(EXTENSIONS))
    return out[:num] if num else out


FORMATS = {"png": ("PNG", {"compress_level": 1}), "jpeg": ("JPEG", {"quality": 95})}


def turned_pages(pages, fmt="png"):
    """[(page path, k, bytes of the page turned k quarter turns ccw, as fmt)]."""
    from PIL import Image, ImageOps
    name, options = FORMATS[fmt]
    out = []
    for path in pages:
        with Image.open(path) as image:
            upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        for k in range(4):
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(np.rot90(upright, k))).save(
                buffer, name, **options)
            out.append((path, k, buffer.getvalue()))
    return out


def write_items(items, folder, fmt="png"):
    """Writes every item's bytes to folder/NNNNNN.<fmt>; -> the paths, in order."""
    from upright.pipeline import fileio
    paths = []
    for i, (_, _, data) in enumerate(items):
        path = os.path.join(folder, f"{i:06d}.{'jpg' if fmt == 'jpeg' else fmt}")
        fileio.write_bytes(path, data, durable=False)
        paths.append(path)
    return paths


def tesseract_answer(path, tesseract="tesseract", timeout=120):
    """k from Tesseract OSD, or None when it gives no answer."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    try:
        proc = subprocess.run([tesseract, path, "-", "--psm", "0"], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    match = ROTATE.search(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not match:
        return None
    return (int(match.group(1)) // 90) % 4


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_tesseract(paths, jobs, tesseract):
    """Answers (k or None) for every file; -> (answers, seconds, CPU seconds of
    the tesseract processes)."""
    start, cpu = time.perf_counter(), children_cpu_seconds()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        answers = list(pool.map(lambda p: tesseract_answer(p, tesseract), paths))
    return answers, time.perf_counter() - start, children_cpu_seconds() - cpu


def run_model(paths, model, jobs, batch_size, max_side):
    """(argmax k, confidence) for every file, through orient.orient_images;
    -> (answers, confidences, seconds, CPU seconds of this process)."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(jobs)
    tf.config.threading.set_inter_op_parallelism_threads(jobs)
    from upright.pipeline import orient, schema, serve
    predictor = serve.load_model(model, workers=jobs)
    # One warm-up batch (graph tracing, interpreter allocation): not timed.
    orient.orient_images(paths[:batch_size], predictor=predictor, batch_size=batch_size,
                         max_side=max_side)
    start, cpu = time.perf_counter(), time.process_time()
    rows = orient.orient_images(paths, predictor=predictor, batch_size=batch_size,
                                max_side=max_side)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    failed = [r for r in rows if r["error"]]
    if failed:
        sys.exit(f"bench_tesseract: the model could not read {failed[0]['path']}: "
                 f"{failed[0]['error']}")
    probs = np.array([[r["probabilities"][name] for name in schema.CLASS_NAMES] for r in rows])
    return probs.argmax(1), probs.max(1), seconds, cpu


def run_model_stored(paths, model, jobs, batch_size, max_side):
    """run_model the way orient read files before open_for_model, for comparison:
    imageio.read_upright's 512-side stored copy, then predictor.preprocess, one
    thread, one interpreter."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(jobs)
    tf.config.threading.set_inter_op_parallelism_threads(jobs)
    from upright.pipeline import imageio, serve
    predictor = serve.load_model(model)

    def read(path):
        stored = imageio.read_upright(path, max_side=max_side)
        return predictor.preprocess(stored.encoded)

    predictor.predict_images(read(paths[0])[None])   # warm-up, not timed
    start, cpu = time.perf_counter(), time.process_time()
    probs = [predictor.predict_images(np.stack([read(p) for p in paths[i:i + batch_size]]),
                                      batch_size=batch_size)
             for i in range(0, len(paths), batch_size)]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    probs = np.concatenate(probs)
    return probs.argmax(1), probs.max(1), seconds, cpu


def score(labels, answers, seconds, answered=None, cpu_seconds=None) -> dict:
    """Metrics of one system; answers: k or -1 for no answer."""
    labels, answers = np.asarray(labels), np.asarray(answers)
    answered = answers >= 0 if answered is None else np.asarray(answered)
    correct = answers == labels
    confusion = np.zeros([4, 4], int)
    for y, a in zip(labels, answers):
        if a >= 0:
            confusion[y, a] += 1
    n0, n180 = int(np.sum(labels == 0)), int(np.sum(labels == 2))
    return {
        "images": int(labels.size),
        "accuracy": float(np.mean(correct)),
        "answered": float(np.mean(answered)),
        "answered_accuracy": (float(np.mean(correct[answered])) if answered.any() else None),
        "pages_per_s": float(labels.size / seconds) if seconds > 0 else None,
        "seconds": round(float(seconds), 2),
        "cpu_ms_per_image": (round(1000 * cpu_seconds / labels.size, 1)
                             if cpu_seconds is not None else None),
        "upright_answered_180": f"{int(confusion[0, 2])}/{n0}",
        "upside_down_answered_0": f"{int(confusion[2, 0])}/{n180}",
        "confusion_true_by_answer": confusion.tolist(),
    }


def format_table(results) -> str:
    names = list(results)
    rows = [("accuracy (all 4 turns, no answer = wrong)", "accuracy", "{:.4f}"),
            ("answered", "answered", "{:.4f}"),
            ("accuracy on answered", "answered_accuracy", "{:.4f}"),
            ("pages/s", "pages_per_s", "{:.2f}"),
            ("CPU ms per image", "cpu_ms_per_image", "{:.1f}"),
            ("upright answered 180", "upright_answered_180", "{}"),
            ("upside-down answered 0", "upside_down_answered_0", "{}")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>22}" for n in names)]
    for title, key, fmt in rows:
        cells = [fmt.format(results[n][key]) if results[n][key] is not None else "-"
                 for n in names]
        lines.append(f"{title:<{width}}  " + "  ".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", required=True, help="folder of held-out upright pages")
    parser.add_argument("--model", required=True, help="model folder or built-in name")
    parser.add_argument("--num", type=int, default=0, help="first N pages only (0 = all)")
    parser.add_argument("--jobs", type=int, default=2, help="cores for each system")
    parser.add_argument("--min_confidence", type=float, default=0.9,
                        help="the model's abstain threshold (orient's default)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_side", type=int, default=512,
                        help="as make_records/orient store images")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png",
                        help="how the turned pages are stored for both systems")
    parser.add_argument("--also_stored_copy", action="store_true",
                        help="also time the model through the stored copy orient "
                             "used to make (read_upright + preprocess, one thread)")
    parser.add_argument("--tesseract", default="tesseract")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if subprocess.run(["which", args.tesseract], capture_output=True).returncode != 0:
        sys.exit("bench_tesseract: tesseract not found (apt-get install tesseract-ocr "
                 "tesseract-ocr-osd)")
    pages = list_pages(args.pages, args.num)
    if not pages:
        sys.exit(f"bench_tesseract: no page images in {args.pages}")
    items = turned_pages(pages, args.format)
    labels = [k for _, k, _ in items]
    load = {}
    with tempfile.TemporaryDirectory(prefix="bench_tesseract-") as tmp:
        paths = write_items(items, tmp, args.format)
        load["model_before"] = os.getloadavg()
        k, confidence, model_s, model_cpu = run_model(paths, args.model, args.jobs, args.batch_size,
                                           args.max_side)
        load["model_after"] = os.getloadavg()
        if args.also_stored_copy:
            k_old, confidence_old, old_s, old_cpu = run_model_stored(paths, args.model, args.jobs,
                                                            args.batch_size, args.max_side)
            load["stored_copy_after"] = os.getloadavg()
        load["tesseract_before"] = os.getloadavg()
        tess, tess_s, tess_cpu = run_tesseract(paths, args.jobs, args.tesseract)
        load["tesseract_after"] = os.getloadavg()
    model_off = score(labels, k, model_s, answered=np.ones(len(k), bool), cpu_seconds=model_cpu)
    model_at = score(labels, np.where(confidence >= args.min_confidence, k, -1), model_s,
                     cpu_seconds=model_cpu)
    results = {
        f"model (threshold off)": model_off,
        f"model (>= {args.min_confidence})": model_at,
        **({"model via stored copy (off)": score(labels, k_old, old_s,
                                                  answered=np.ones(len(k_old), bool),
                                                  cpu_seconds=old_cpu),
            f"stored copy (>= {args.min_confidence})": score(
                labels, np.where(confidence_old >= args.min_confidence, k_old, -1), old_s,
                cpu_seconds=old_cpu)}
           if args.also_stored_copy else {}),
        "tesseract --psm 0": score(labels, [-1 if a is None else a for a in tess], tess_s,
                                   cpu_seconds=tess_cpu),
    }
    summary = {"pages": len(pages), "images": len(items), "jobs": args.jobs,
               "format": args.format, "model": args.model,
               "min_confidence": args.min_confidence,
               "load_average_1_5_15_min": {k: [round(v, 2) for v in a] for k, a in load.items()},
               "command": "python benchmarks/bench_tesseract.py "
                          + " ".join(sys.argv[1:] if argv is None else argv),
               "results": results}
    print(format_table(results))
    model_r, tess_r = results["model (threshold off)"], results["tesseract --psm 0"]
    summary["speed_up_pages_per_s"] = model_r["pages_per_s"] / max(tess_r["pages_per_s"], 1e-9)
    summary["cpu_ratio"] = tess_r["cpu_ms_per_image"] / max(model_r["cpu_ms_per_image"], 1e-9)
    print(f"{len(pages)} pages x 4 turns = {len(items)} images; {args.jobs} cores each; "
          f"speed-up {summary['speed_up_pages_per_s']:.1f}x in pages/s, "
          f"{summary['cpu_ratio']:.1f}x in CPU per image; "
          f"{args.format} files; load average (1 min) "
          + ", ".join(f"{k} {v[0]:.1f}" for k, v in load.items()))
    if args.out:
        from upright.pipeline import fileio
        fileio.write_json(args.out, summary, indent=2)
        print(f"results: {args.out}")


if __name__ == "__main__":
    main()
