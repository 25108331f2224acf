"""Measuring an orientation model honestly: accuracy, confusion, calibration,
coverage, and test-time agreement over the four rotations.

The metric functions are pure numpy on
  probs:  float [N, 4], each row a probability vector over classes "0".."270";
  labels: int [N] in [0, 4)
and are tested on hand-made arrays. `evaluate` runs a model over a records
split (every image in all four orientations, via input_fn(training=False)),
computes them all, and writes JSON + PNG files.

Definitions (written down only here; BUILD.md section 7 points here):
* accuracy: mean(argmax(probs) == label); per-class accuracy: the same over the
  examples of one true class (the recall of that class).
* confusion[t, p]: number of examples of true class t predicted as p.
* confidence: max(probs) of a row. ECE (expected calibration error): confidences
  in `num_bins` equal-width bins over [0, 1] (bin i holds (i/n, (i+1)/n], bin 0
  also holds 0); ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|.
* coverage curve, for a threshold t: images with confidence < t are left alone;
  left_alone = their fraction; coverage = 1 - left_alone; error_acted = error
  rate among the others (None when none is left); acted_wrong = fraction of ALL
  images that are acted on and wrongly predicted (with `orient --min_confidence
  t`: the images it would turn wrongly or wrongly call upright).
* temperature scaling (reported, not applied): the T minimising the negative
  log-likelihood of softmax(log p / T) on the split, with the ECE and coverage it
  would give. Fitted and judged on the same split, so optimistic; it shows
  whether a model is over- (T > 1) or under-confident (T < 1).
* test-time agreement (TTA): the model also sees the image turned j = 1, 2, 3
  more quarter turns. If x has label y, rot90(x, j) has label (y + j) % 4, so
  its probability vector p_j is shifted back with q_j[c] = p_j[(c + j) % 4]
  (np.roll(p_j, -j)). The four q_j are combined by averaging LOG-probabilities
  (a product of experts, renormalised with softmax): one confident, wrong view
  cannot outvote three agreeing ones as easily as with a mean of
  probabilities. agreement = fraction of images whose four argmax(q_j) agree.
"""
import csv
import math
import os

import numpy as np

from upright.pipeline import fileio, schema

DEFAULT_NUM_BINS = 15   # Guo et al. 2017 (On Calibration of Modern Neural Networks)
# Thresholds for the coverage curve: every 0.01 from 0 to 0.99, plus the tail
# where a careful user sits.
DEFAULT_THRESHOLDS = tuple(round(i / 100, 2) for i in range(100)) + (0.995, 0.999)
# Thresholds shown in the printed summary.
SUMMARY_THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)
_EPS = 1e-12
_BIN_EPS = 1e-6
COVERAGE_DEFINITION = (
    "threshold t: images with confidence (max probability) < t are left alone; "
    "left_alone = their fraction, coverage = 1 - left_alone, error_acted = error rate "
    "among the images with confidence >= t (null if none), acted_wrong = fraction of all "
    "images that are acted on and wrongly predicted")


# ---------------------------------------------------------------------------
# Pure numpy metrics.

def _check(probs, labels=None):
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != schema.NUM_CLASSES:
        raise ValueError(f"probs must be [N, {schema.NUM_CLASSES}], got {probs.shape}")
    if labels is None:
        return probs
    labels = np.asarray(labels, np.int64)
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be [{probs.shape[0]}], got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= schema.NUM_CLASSES):
        raise ValueError("labels must be in [0, 4)")
    return probs, labels


def predictions(probs) -> np.ndarray:
    """argmax class int64 [N] (ties: the lowest class index, like np.argmax)."""
    return np.argmax(_check(probs), axis=1)


def confidences(probs) -> np.ndarray:
    """max probability float64 [N]."""
    return np.max(_check(probs), axis=1)


def accuracy(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    return float(np.mean(np.argmax(probs, axis=1) == labels)) if labels.size else float("nan")


def per_class_accuracy(probs, labels) -> list:
    """[4] accuracy among examples of each true class (NaN for an absent class)."""
    probs, labels = _check(probs, labels)
    pred = np.argmax(probs, axis=1)
    return [float(np.mean(pred[labels == c] == c)) if np.any(labels == c) else float("nan")
            for c in range(schema.NUM_CLASSES)]


def confusion_matrix(probs, labels) -> np.ndarray:
    """int64 [4, 4]: rows = true class, columns = predicted class."""
    probs, labels = _check(probs, labels)
    matrix = np.zeros([schema.NUM_CLASSES] * 2, np.int64)
    np.add.at(matrix, (labels, np.argmax(probs, axis=1)), 1)
    return matrix


def calibration(probs, labels, num_bins: int = DEFAULT_NUM_BINS) -> dict:
    """Expected calibration error over equal-width confidence bins.

    Returns:
      {"ece": float, "num_bins": int, "bins": [{"lower", "upper", "count",
       "accuracy", "confidence"} ...]} -- accuracy/confidence None for empty bins.
    """
    probs, labels = _check(probs, labels)
    if num_bins < 1:
        raise ValueError("num_bins must be >= 1")
    conf = np.max(probs, axis=1)
    correct = np.argmax(probs, axis=1) == labels
    # Bin i holds (i/n, (i+1)/n]; ceil(conf * n) - 1 gives that index, 0 -> bin 0.
    # _BIN_EPS: a float32 confidence of exactly i/n (stored as i/n + 1e-8) stays in bin i-1.
    index = np.clip(np.ceil(conf * num_bins - _BIN_EPS).astype(np.int64) - 1, 0, num_bins - 1)
    bins, ece, n = [], 0.0, max(len(labels), 1)
    for i in range(num_bins):
        mask = index == i
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        mean_conf = float(conf[mask].mean()) if count else None
        if count:
            ece += count / n * abs(acc - mean_conf)
        bins.append({"lower": i / num_bins, "upper": (i + 1) / num_bins, "count": count,
                     "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece), "num_bins": num_bins, "bins": bins}


def coverage_curve(probs, labels, thresholds=DEFAULT_THRESHOLDS) -> list:
    """Error versus coverage for a confidence threshold (see module docstring).

    Returns:
      [{"threshold", "left_alone", "coverage", "error_acted", "acted_wrong"}] in
      the order of `thresholds`; fractions in [0, 1], error_acted None when no
      image is acted on.
    """
    probs, labels = _check(probs, labels)
    conf = np.max(probs, axis=1)
    wrong = np.argmax(probs, axis=1) != labels
    n = len(labels)
    rows = []
    for t in thresholds:
        acted = conf >= t
        k = int(acted.sum())
        rows.append({"threshold": float(t),
                     "left_alone": float(1 - k / n) if n else float("nan"),
                     "coverage": float(k / n) if n else float("nan"),
                     "error_acted": float(wrong[acted].mean()) if k else None,
                     "acted_wrong": float((wrong & acted).sum() / n) if n else float("nan")})
    return rows


def shift_back(probs_rotated, quarter_turns: int) -> np.ndarray:
    """Probabilities predicted on rot90(x, j) -> probabilities about x itself.

    rot90(x, j) of an image x with label y has label (y + j) % 4, so
    q[c] = p[(c + j) % 4]. probs_rotated: [N, 4]; returns [N, 4].
    """
    return np.roll(np.asarray(probs_rotated), -int(quarter_turns), axis=-1)


def combine_rotations(probs_by_turn) -> tuple:
    """Test-time agreement over the four rotations of the input.

    Args:
      probs_by_turn: [4, N, 4]; probs_by_turn[j] = model(rot90(x, j)).
    Returns:
      (combined [N, 4]: softmax of the mean of the shifted-back log-probabilities,
       agree bool [N]: the four shifted-back argmaxes are equal).
    """
    stack = np.asarray(probs_by_turn, np.float64)
    if stack.ndim != 3 or stack.shape[0] != schema.NUM_CLASSES:
        raise ValueError(f"probs_by_turn must be [4, N, 4], got {stack.shape}")
    shifted = np.stack([shift_back(stack[j], j) for j in range(schema.NUM_CLASSES)])
    logp = np.mean(np.log(np.clip(shifted, _EPS, 1.0)), axis=0)
    logp -= logp.max(axis=1, keepdims=True)
    combined = np.exp(logp)
    combined /= combined.sum(axis=1, keepdims=True)
    votes = np.argmax(shifted, axis=2)
    agree = np.all(votes == votes[:1], axis=0)
    return combined, agree


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """softmax(log(probs) / T): the model's probabilities with logits divided by T
    (log p differs from the logits by a per-row constant). T > 1 softens."""
    logp = np.log(np.clip(np.asarray(probs, np.float64), _EPS, 1.0)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp)
    return out / out.sum(axis=1, keepdims=True)


def negative_log_likelihood(probs, labels) -> float:
    probs, labels = _check(probs, labels)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], _EPS, 1.0))))


def fit_temperature(probs, labels, *, lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature scaling (Guo et al. 2017): the T in [lo, hi] that minimises the
    negative log-likelihood of apply_temperature(probs, T). Golden-section search
    on log T (the NLL is unimodal in T). Does not change any argmax."""
    probs, labels = _check(probs, labels)
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5) - 1) / 2

    def nll(log_t):
        return negative_log_likelihood(apply_temperature(probs, math.exp(log_t)), labels)

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))


def summarize(probs, labels, *, num_bins: int = DEFAULT_NUM_BINS,
              thresholds=DEFAULT_THRESHOLDS) -> dict:
    """All metrics of one set of predictions, as JSON-ready values."""
    probs, labels = _check(probs, labels)
    per_class = per_class_accuracy(probs, labels)
    return {
        "num_examples": int(len(labels)),
        "accuracy": accuracy(probs, labels),
        "per_class_accuracy": {name: _nan_to_none(a)
                               for name, a in zip(schema.CLASS_NAMES, per_class)},
        "confusion_matrix": confusion_matrix(probs, labels).tolist(),
        "calibration": calibration(probs, labels, num_bins),
        "coverage": coverage_curve(probs, labels, thresholds),
        "mean_confidence": float(np.mean(np.max(probs, axis=1))) if len(labels) else None,
    }


def chance_warning(accuracy: float, examples: int, temperature=None):
    """A plain sentence when the model is no better than guessing, else None.

    Guessing scores 0.25 on the four balanced turns, with a binomial standard
    error of sqrt(0.25 * 0.75 / n); within two of them the run has not shown it
    learned anything. A fitted temperature at the end of its search range
    (fit_temperature: 0.05..20) says the confidences carry nothing, except at
    the low end when (nearly) every val example is right: sharpening then
    always lowers the loss (the demo model's case), which is no fault.
    """
    margin = 2 * (0.1875 / max(1, examples)) ** 0.5
    if accuracy <= 0.25 + margin:
        return (f"val accuracy {accuracy:.3f} on {examples} examples is within chance "
                f"(0.25 +- {margin:.3f}): this model has not learned orientation; train longer, "
                "on more images, or from a pretrained backbone (BUILD.md, section 6)")
    if temperature is not None and (temperature > 19.0
                                    or (temperature < 0.06 and accuracy < 0.99)):
        return (f"the fitted temperature {temperature:.3g} sits at the end of its range: "
                "the model's confidences carry no information; do not trust "
                "--min_confidence with it")
    return None


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# ---------------------------------------------------------------------------
# Running a model over records.

def predict_split(predictor, records: str, *, split: str = "val", batch_size: int = 64,
                  tta: bool = False, limit_batches: int = None) -> dict:
    """Runs `predictor` over every image of `split` in all four orientations.

    Args:
      predictor: serve.Predictor (or anything with predict_images, image_size, resize).
      records: a make_records folder.
    Returns:
      {"probs": float32 [4N, 4], "labels": int32 [4N],
       and with tta: "probs_by_turn": float32 [4, 4N, 4]}.
    """
    import tensorflow as tf
    from upright.pipeline import inputs
    ds = inputs.input_fn(records, split=split, batch_size=batch_size,
                         image_size=predictor.image_size, training=False,
                         resize=predictor.resize)
    if limit_batches:
        ds = ds.take(limit_batches)
    probs, labels, by_turn = [], [], [[] for _ in range(schema.NUM_CLASSES)]
    # A damaged shard stops the read with an error naming the file and record.
    with inputs.naming_damaged_records(records, split):
        for images, batch_labels in ds:
            labels.append(batch_labels.numpy())
            turns = range(schema.NUM_CLASSES) if tta else (0,)
            for j in turns:
                rotated = images if j == 0 else tf.image.rot90(images, j)
                p = predictor.predict_images(rotated.numpy())
                if j == 0:
                    probs.append(p)
                if tta:
                    by_turn[j].append(p)
    if not labels:
        raise ValueError(f"split {split!r} of {records} yielded no examples")
    out = {"probs": np.concatenate(probs).astype(np.float32),
           "labels": np.concatenate(labels).astype(np.int32)}
    if tta:
        out["probs_by_turn"] = np.stack([np.concatenate(b) for b in by_turn]).astype(np.float32)
    return out


def score_classifier(model, records: str, *, batch_size: int, image_size: int,
                     resize: str) -> dict:
    """The trainer's final metrics of a Keras classifier on the whole val split (x4):
    accuracy, per-class accuracy and a fitted temperature, with the ECE before
    and after it.

    The temperature (fit_temperature, Guo et al. 2017) rescales the logits so
    that confidences match accuracy on validation; it never changes a
    prediction. Heavy training-time augmentation leaves models under-confident
    on clean inputs, and orient's --min_confidence needs honest numbers.
    """
    import types
    predictor = types.SimpleNamespace(image_size=image_size, resize=resize,
                                      predict_images=model.predict_on_batch)
    out = predict_split(predictor, records, split="val", batch_size=batch_size)
    probs, labels = out["probs"], out["labels"]
    temperature = fit_temperature(probs, labels)
    return {"val_accuracy": accuracy(probs, labels), "val_examples": int(labels.size),
            "per_class_accuracy": {name: _nan_to_none(a) for name, a in
                                   zip(schema.CLASS_NAMES, per_class_accuracy(probs, labels))},
            "temperature": temperature,
            "val_ece": calibration(probs, labels)["ece"],
            "val_ece_after_temperature": calibration(
                apply_temperature(probs, temperature), labels)["ece"]}


def evaluate(model_dir: str, records: str, *, split: str = "val", batch_size: int = 64,
             tta: bool = False, out_json: str = None, num_bins: int = DEFAULT_NUM_BINS,
             plots: bool = True, predictor=None, trust_model: bool = False) -> dict:
    """Evaluates a trained model on a records split; writes JSON (+ PNGs).

    Args:
      model_dir: a trainer model_dir (or SavedModel export), see serve.load_model_dir.
      records: make_records folder; split: its split to score.
      tta: also score test-time agreement over the four rotations (4x the work).
      out_json: result file; default MODEL_DIR/eval_<split>.json. PNGs and the
        coverage JSON go beside it: <stem>_confusion.png, <stem>_reliability.png,
        <stem>_coverage.png, <stem>_coverage.json.
      predictor: an already loaded model (tests); default: load model_dir.
      trust_model: load a SavedModel without scanning its ops (serve.load_model_dir).
    Returns:
      the result dict that was written.
    """
    from upright.pipeline import serve
    if predictor is None:
        predictor = serve.load_model(model_dir, trust_model=trust_model)
    if out_json is None:
        out_json = os.path.join(model_dir, f"eval_{split}.json")
    from upright.pipeline import inputs
    # The ids first: cheap, and a damaged shard stops the run before the scoring.
    ids = inputs.source_ids(records, split)
    predicted = predict_split(predictor, records, split=split, batch_size=batch_size, tta=tta)
    probs, labels = predicted["probs"], predicted["labels"]
    result = {"model": os.path.abspath(model_dir), "records": os.path.abspath(records),
              "split": split, "num_images": int(len(labels) // schema.NUM_CLASSES),
              "image_size": predictor.image_size, "resize": predictor.resize,
              "class_names": list(schema.CLASS_NAMES), "convention": schema.convention()}
    result.update(summarize(probs, labels, num_bins=num_bins))
    result["temperature_scaling"] = score_temperature_scaling(probs, labels, num_bins=num_bins)
    if tta:
        combined, result["tta"] = score_tta(predicted["probs_by_turn"], labels,
                                            num_bins=num_bins)
    stem = os.path.splitext(out_json)[0]
    files = {"json": out_json, "coverage_json": stem + "_coverage.json",
             "images_csv": stem + "_images.csv"}
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    _write_json(files["coverage_json"], {"definition": COVERAGE_DEFINITION,
                                         "coverage": result["coverage"]})
    write_image_rows(files["images_csv"], ids, probs, labels, combined if tta else None)
    result["files"] = files
    if plots:
        files.update(write_plots(result, stem))
    _write_json(out_json, result)
    return result


def score_temperature_scaling(probs, labels, *, num_bins: int = DEFAULT_NUM_BINS) -> dict:
    """What temperature scaling would do to calibration: evaluate's
    "temperature_scaling" block.

    probs: float [N, 4], rows summing to 1; labels: int [N] in [0, 4).
    -> {"temperature" (> 0, fit_temperature), "note", "nll_before", "nll_after",
    "ece_after", "coverage_after" (coverage_curve rows at SUMMARY_THRESHOLDS)}.
    Fitted on this same split, so the "after" numbers are optimistic: fit on
    val, judge on another split.
    """
    temperature = fit_temperature(probs, labels)
    scaled = apply_temperature(probs, temperature)
    scaled_coverage = {r["threshold"]: r for r in coverage_curve(scaled, labels)}
    return {
        "temperature": temperature,
        "note": "fitted on this split (optimistic); probabilities = softmax(log p / T)",
        "nll_before": negative_log_likelihood(probs, labels),
        "nll_after": negative_log_likelihood(scaled, labels),
        "ece_after": calibration(scaled, labels, num_bins)["ece"],
        "coverage_after": [scaled_coverage[t] for t in SUMMARY_THRESHOLDS],
    }


def score_tta(probs_by_turn, labels, *, num_bins: int = DEFAULT_NUM_BINS) -> tuple:
    """Test-time agreement over the four rotations: evaluate's "tta" block.

    probs_by_turn: float [4, N, 4]; probs_by_turn[j] = model(rot90(x, j)), as
    predict_split gives them; labels: int [N] in [0, 4).
    -> (combined float [N, 4] (combine_rotations), {"combine", "accuracy",
    "per_class_accuracy", "confusion_matrix", "ece", "agreement" (fraction in
    [0, 1] of inputs whose four turns agree), "accuracy_when_agree",
    "accuracy_when_disagree" (None when no such input)}).
    """
    combined, agree = combine_rotations(probs_by_turn)
    tta_summary = summarize(combined, labels, num_bins=num_bins)
    return combined, {
        "combine": "mean of log-probabilities over the 4 shifted-back rotations, softmax",
        "accuracy": tta_summary["accuracy"],
        "per_class_accuracy": tta_summary["per_class_accuracy"],
        "confusion_matrix": tta_summary["confusion_matrix"],
        "ece": tta_summary["calibration"]["ece"],
        "agreement": float(np.mean(agree)),
        "accuracy_when_agree": _nan_to_none(accuracy(combined[agree], labels[agree]))
        if agree.any() else None,
        "accuracy_when_disagree": _nan_to_none(accuracy(combined[~agree], labels[~agree]))
        if (~agree).any() else None,
    }


IMAGE_COLUMNS = ("source_id", "true_angle", "predicted_angle", "confidence", "correct")


def write_image_rows(path: str, ids, probs, labels, tta_probs=None) -> None:
    """One CSV row per scored example, for error analysis (which pictures fail).

    ids: the split's source ids (bytes), image i of the stream; example j is
    image j // 4 turned labels[j] quarter turns (inputs.source_ids' order).
    Columns: IMAGE_COLUMNS (angles in degrees counter-clockwise, as the class
    names; confidence = the predicted class's probability; correct 0/1), then
    tta_predicted_angle, tta_correct with test-time agreement.
    """
    if len(ids) * schema.NUM_CLASSES != len(labels):
        raise ValueError(f"{len(ids)} source ids for {len(labels)} examples: the records "
                         "changed while they were scored")
    pred, conf = predictions(probs), confidences(probs)
    header = list(IMAGE_COLUMNS)
    if tta_probs is not None:
        header += ["tta_predicted_angle", "tta_correct"]
        tta_pred = predictions(tta_probs)
    with fileio.atomic_write(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(header)
        for j, label in enumerate(labels):
            # Names that are not UTF-8 stay readable (\xNN, as info.json shows them).
            row = [ids[j // schema.NUM_CLASSES].decode("utf-8", "backslashreplace"),
                   schema.ANGLES_CCW[label], schema.ANGLES_CCW[pred[j]], f"{conf[j]:.6f}",
                   int(pred[j] == label)]
            if tta_probs is not None:
                row += [schema.ANGLES_CCW[tta_pred[j]], int(tta_pred[j] == label)]
            out.writerow(row)


def write_plots(result: dict, stem: str) -> dict:
    """Draws the confusion matrix, reliability diagram and coverage curve (Pillow)."""
    paths = {"confusion_png": stem + "_confusion.png",
             "reliability_png": stem + "_reliability.png",
             "coverage_png": stem + "_coverage.png"}
    draw_confusion(result["confusion_matrix"], paths["confusion_png"],
                   title=f"confusion ({result.get('split', '')}), accuracy "
                         f"{100 * result['accuracy']:.2f} %")
    draw_reliability(result["calibration"], paths["reliability_png"])
    draw_coverage(result["coverage"], paths["coverage_png"])
    return paths


def format_summary(result: dict) -> str:
    """A readable text summary of an evaluate() result."""
    lines = [f"model {result['model']}  records {result['records']}  split {result['split']}",
             f"{result['num_images']} images x 4 orientations = {result['num_examples']} examples"
             f" (image_size {result['image_size']}, resize {result['resize']})",
             f"accuracy {100 * result['accuracy']:.2f} %" + (
                 f"   with test-time agreement (TTA) {100 * result['tta']['accuracy']:.2f} %, "
                 f"the four rotations agree on {100 * result['tta']['agreement']:.2f} %"
                 if "tta" in result else ""),
             "per-class accuracy: " + "  ".join(
                 f"{name}: {_pct(a)}" for name, a in result["per_class_accuracy"].items()),
             "confusion matrix (rows: true, columns: predicted):",
             format_confusion(result["confusion_matrix"]),
             f"expected calibration error ({result['calibration']['num_bins']} equal-width bins): "
             f"{100 * result['calibration']['ece']:.2f} %   mean confidence "
             f"{_pct(result['mean_confidence'])}",
             "confidence threshold -> left alone, error among the rest, "
             "acted on and wrong (of all):"]
    if "temperature_scaling" in result:
        ts = result["temperature_scaling"]
        lines.insert(len(lines) - 1,
                     f"temperature scaling (fitted on this split, optimistic): T = "
                     f"{ts['temperature']:.3g}, ECE after {100 * ts['ece_after']:.2f} %")
    by_t = {row["threshold"]: row for row in result["coverage"]}
    for t in SUMMARY_THRESHOLDS:
        row = by_t.get(t)
        if row:
            lines.append(f"  {t:<5}  left alone {_pct(row['left_alone'])}  "
                         f"error {_pct(row['error_acted'])}  "
                         f"acted+wrong {_pct(row['acted_wrong'])}")
    folders = sorted({os.path.dirname(p) for p in result["files"].values()})
    lines.append(f"files in {', '.join(folders)}: "
                 + ", ".join(os.path.basename(p) for p in result["files"].values()))
    return "\n".join(lines)


def format_confusion(matrix) -> str:
    names = schema.CLASS_NAMES
    width = max(6, max(len(str(v)) for row in matrix for v in row) + 2)
    head = "true\\pred".ljust(10) + "".join(n.rjust(width) for n in names)
    rows = [name.ljust(10) + "".join(str(v).rjust(width) for v in row)
            for name, row in zip(names, matrix)]
    return "\n".join([head] + rows)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _write_json(path, obj):
    fileio.write_json(path, obj, indent=2, final_newline=False)


def _save_image(image, path):
    """image.save(path) without writing through a link planted at path (fileio)."""
    with fileio.replacing(path, suffix=os.path.splitext(path)[1]) as tmp:
        image.save(tmp)


# ---------------------------------------------------------------------------
# Plots drawn with Pillow (no matplotlib dependency for three simple charts).

_W, _H, _M = 480, 400, 60   # canvas width, height, margin (pixels)


def _canvas(title):
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_M, 15), title, fill="black", font=_font())
    return image, draw


def _font(size=13):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _axes(draw, xlabel, ylabel, xticks, yticks):
    """Plot area [M, W-M] x [M, H-M]; ticks are values in [0, 1]."""
    x0, y0, x1, y1 = _M, _M, _W - _M // 2, _H - _M
    draw.rectangle([x0, y0, x1, y1], outline="black")
    for v in xticks:
        x = x0 + v * (x1 - x0)
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 10, y1 + 6), f"{v:g}", fill="black", font=_font(11))
    for v in yticks:
        y = y1 - v * (y1 - y0)
        draw.line([x0 - 4, y, x0, y], fill="black")
        draw.text((x0 - 34, y - 6), f"{v:g}", fill="black", font=_font(11))
    draw.text(((x0 + x1) // 2 - 40, y1 + 22), xlabel, fill="black", font=_font())
    draw.text((5, y0 - 22), ylabel, fill="black", font=_font())
    return x0, y0, x1, y1


def draw_confusion(matrix, path, title="confusion matrix"):
    """Heat map with counts; rows true class, columns predicted."""
    matrix = np.asarray(matrix)
    image, draw = _canvas(title)
    n = len(matrix)
    cell = (min(_W, _H) - 2 * _M - 20) // n
    x0, y0 = _M + 40, _M + 30
    row_sums = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for t in range(n):
        draw.text((x0 - 40, y0 + t * cell + cell // 2 - 6), schema.CLASS_NAMES[t], fill="black",
                  font=_font())
        draw.text((x0 + t * cell + cell // 2 - 10, y0 - 20), schema.CLASS_NAMES[t],
                  fill="black", font=_font())
        for p in range(n):
            share = matrix[t, p] / row_sums[t, 0]
            shade = int(255 - 200 * share)
            box = [x0 + p * cell, y0 + t * cell, x0 + (p + 1) * cell, y0 + (t + 1) * cell]
            draw.rectangle(box, fill=(shade, shade, 255), outline="gray")
            draw.text((box[0] + 8, box[1] + cell // 2 - 6), str(matrix[t, p]),
                      fill="black" if share < 0.6 else "white", font=_font())
    draw.text((x0, y0 + n * cell + 8), "rows: true class, columns: predicted (degrees ccw)",
              fill="black", font=_font(11))
    _save_image(image, path)


def draw_reliability(calibration_result, path):
    """Bars: accuracy per confidence bin; diagonal: perfect calibration."""
    image, draw = _canvas(f"reliability, ECE {100 * calibration_result['ece']:.2f} % "
                          f"({calibration_result['num_bins']} bins)")
    x0, y0, x1, y1 = _axes(draw, "confidence", "accuracy", (0, 0.25, 0.5, 0.75, 1),
                           (0, 0.25, 0.5, 0.75, 1))
    draw.line([x0, y1, x1, y0], fill="gray", width=1)
    for b in calibration_result["bins"]:
        if not b["count"]:
            continue
        left = x0 + b["lower"] * (x1 - x0)
        right = x0 + b["upper"] * (x1 - x0)
        top = y1 - b["accuracy"] * (y1 - y0)
        draw.rectangle([left + 1, top, right - 1, y1], fill=(90, 120, 220), outline="black")
        conf_y = y1 - b["confidence"] * (y1 - y0)
        draw.line([left + 1, conf_y, right - 1, conf_y], fill="red", width=2)
    draw.text((x0 + 8, y0 + 8), "bars: accuracy, red: mean confidence", fill="black",
              font=_font(11))
    _save_image(image, path)


def draw_coverage(rows, path):
    """Error among acted-on images (red) and fraction left alone (blue) vs threshold."""
    image, draw = _canvas("confidence threshold: left alone and error")
    x0, y0, x1, y1 = _axes(draw, "threshold", "fraction", (0, 0.25, 0.5, 0.75, 1),
                           (0, 0.25, 0.5, 0.75, 1))
    worst = max([r["error_acted"] for r in rows if r["error_acted"] is not None] + [0.0])
    # Error is usually small: draw it on its own scale, stated in the legend.
    scale = 1.0 if worst > 0.5 else max(worst * 1.25, 1e-3)
    for key, colour, s in (("left_alone", (40, 90, 220), 1.0),
                           ("error_acted", (220, 40, 40), scale)):
        points = [(x0 + r["threshold"] * (x1 - x0), y1 - min(r[key] / s, 1.0) * (y1 - y0))
                  for r in rows if r[key] is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
    draw.text((x0 + 8, y0 + 8), "blue: left alone (fraction)", fill=(40, 90, 220), font=_font(11))
    draw.text((x0 + 8, y0 + 24), f"red: error among the rest (top of axis = {scale:.3g})",
              fill=(220, 40, 40), font=_font(11))
    _save_image(image, path)
