"""evaluation: exact metric values on hand-made arrays and on stub models."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from upright.pipeline import evaluation, serve
from tests import helpers

S = 16


def onehotish(classes, conf):
    """Rows with probability `conf` on `classes[i]`, the rest spread evenly."""
    probs = np.full([len(classes), 4], 0.0)
    for i, (c, p) in enumerate(zip(classes, conf)):
        probs[i] = (1 - p) / 3
        probs[i, c] = p
    return probs


def test_accuracy_confusion_per_class_exact():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = np.array([0, 1, 1, 1, 0, 2, 3, 2])
    probs = onehotish(pred, [0.7] * 8)
    assert evaluation.accuracy(probs, labels) == 5 / 8
    assert evaluation.per_class_accuracy(probs, labels) == [0.5, 1.0, 0.5, 0.5]
    np.testing.assert_array_equal(evaluation.confusion_matrix(probs, labels), [
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [1, 0, 1, 0],
        [0, 0, 1, 1]])
    # A class with no examples has no accuracy (NaN), not zero.
    assert np.isnan(evaluation.per_class_accuracy(probs[:2], labels[:2])[3])


def test_ece_equal_width_bins_exact():
    # Four at confidence 0.9 (3 right), two at 0.6 (1 right), 10 bins:
    # ECE = 4/6 * |0.75 - 0.9| + 2/6 * |0.5 - 0.6| = 0.1 + 1/30.
    labels = np.array([0, 1, 2, 3, 0, 1])
    pred = np.array([0, 1, 2, 0, 0, 2])
    probs = onehotish(pred, [0.9, 0.9, 0.9, 0.9, 0.6, 0.6]).astype(np.float32)
    cal = evaluation.calibration(probs, labels, num_bins=10)
    assert cal["ece"] == pytest.approx(0.1 + 1 / 30, abs=1e-6)
    counts = [b["count"] for b in cal["bins"]]
    # 0.9 sits in bin (0.8, 0.9], 0.6 in (0.5, 0.6]: upper edges are inclusive.
    assert counts == [0, 0, 0, 0, 0, 2, 0, 0, 4, 0]
    assert cal["bins"][8]["accuracy"] == 0.75
    assert cal["bins"][5]["confidence"] == pytest.approx(0.6, abs=1e-6)
    assert cal["bins"][0]["accuracy"] is None
    # A perfectly calibrated set: confidence 1 and always right -> ECE 0.
    assert evaluation.calibration(onehotish([1, 2], [1.0, 1.0]), [1, 2])["ece"] == 0.0


def test_coverage_curve_exact():
    labels = np.array([0, 1, 2, 3])
    # Confidences 0.3 (wrong), 0.6 (right), 0.9 (wrong), 0.95 (right).
    probs = onehotish([1, 1, 0, 3], [0.3, 0.6, 0.9, 0.95])
    rows = {r["threshold"]: r for r in evaluation.coverage_curve(
        probs, labels, thresholds=(0.0, 0.5, 0.95, 0.99))}
    assert rows[0.0] == {"threshold": 0.0, "left_alone": 0.0, "coverage": 1.0,
                         "error_acted": 0.5, "acted_wrong": 0.5}
    assert rows[0.5]["left_alone"] == 0.25
    assert rows[0.5]["error_acted"] == pytest.approx(1 / 3)
    assert rows[0.5]["acted_wrong"] == 0.25
    # The threshold is inclusive: confidence 0.95 is acted on at 0.95.
    assert rows[0.95] == {"threshold": 0.95, "left_alone": 0.75, "coverage": 0.25,
                          "error_acted": 0.0, "acted_wrong": 0.0}
    assert rows[0.99]["left_alone"] == 1.0 and rows[0.99]["error_acted"] is None


def test_shift_back_maps_rotated_prediction_to_the_original_label():
    # x has label 1. rot90(x, 2) has label 3: a perfect model says 3 on it.
    p = np.eye(4)[[3]]
    np.testing.assert_array_equal(evaluation.shift_back(p, 2), np.eye(4)[[1]])
    for y in range(4):
        for j in range(4):
            shifted = evaluation.shift_back(np.eye(4)[[(y + j) % 4]], j)
            assert np.argmax(shifted) == y


def test_combine_rotations_log_mean_and_agreement():
    # Image with label 2; the four views are predicted perfectly except view 3,
    # which is unsure. Shifted back, all views point at 2.
    views = [onehotish([(2 + j) % 4], [0.97])[0] for j in range(4)]
    views[3] = np.array([0.25, 0.25, 0.25, 0.25])
    combined, agree = evaluation.combine_rotations(np.array(views)[:, None, :])
    assert np.argmax(combined[0]) == 2
    # Log-mean: combined[c] is proportional to the geometric mean of the views.
    expected = np.exp(np.mean(np.log([[0.01, 0.01, 0.97, 0.01]] * 3 + [[0.25] * 4]), axis=0))
    np.testing.assert_allclose(combined[0], expected / expected.sum(), rtol=1e-9)
    # View 3's argmax of a uniform row is class 0 -> the views disagree.
    assert not agree[0]


def test_fit_temperature_recovers_a_known_overconfidence():
    # Labels drawn from softmax(z); the model reports softmax(3 z): over-confident
    # by a factor 3, so the best temperature is 3.
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, size=(20000, 4))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in true])
    reported = evaluation.apply_temperature(true, 1 / 3)
    t = evaluation.fit_temperature(reported, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    # Scaling never changes the predicted class, and lowers the calibration error.
    np.testing.assert_array_equal(evaluation.predictions(evaluation.apply_temperature(
        reported, t)), evaluation.predictions(reported))
    assert (evaluation.calibration(evaluation.apply_temperature(reported, t), labels)["ece"]
            < evaluation.calibration(reported, labels)["ece"] / 3)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    helpers.write_records(out, {"train": [helpers.quadrant_marker_image(9)],
                                "val": [helpers.quadrant_marker_image(i) for i in range(3)]})
    return out


def test_evaluate_fixed_output_model_exact(tmp_path, records):
    model_dir = helpers.write_model_dir(
        str(tmp_path / "model"), helpers.fixed_output_model(S, [0.1, 0.6, 0.2, 0.1]), S)
    result = evaluation.evaluate(model_dir, records, split="val", batch_size=5, tta=True,
                                 num_bins=10)
    # 3 images x 4 orientations; the model always says "90".
    assert result["num_images"] == 3 and result["num_examples"] == 12
    assert result["accuracy"] == 0.25
    assert result["per_class_accuracy"] == {"0": 0.0, "90": 1.0, "180": 0.0, "270": 0.0}
    assert result["confusion_matrix"] == [[0, 3, 0, 0]] * 4
    assert result["calibration"]["ece"] == pytest.approx(0.35, abs=1e-6)
    assert [b["count"] for b in result["calibration"]["bins"]][5] == 12
    rows = {r["threshold"]: r for r in result["coverage"]}
    assert rows[0.5]["left_alone"] == 0.0 and rows[0.5]["error_acted"] == 0.75
    assert rows[0.7]["left_alone"] == 1.0 and rows[0.7]["error_acted"] is None
    # A constant output shifted back by 0..3 points at four different classes: no
    # agreement, and the log-mean over the four shifts is uniform.
    assert result["tta"]["agreement"] == 0.0
    # Files: JSON (default path), coverage JSON and three PNG charts.
    with open(os.path.join(model_dir, "eval_val.json")) as f:
        assert json.load(f)["accuracy"] == 0.25
    for key in ("confusion_png", "reliability_png", "coverage_png"):
        with Image.open(result["files"][key]) as im:
            assert im.size[0] > 100
    with open(result["files"]["coverage_json"]) as f:
        assert len(json.load(f)["coverage"]) == len(evaluation.DEFAULT_THRESHOLDS)
    summary = evaluation.format_summary(result)
    assert "accuracy 25.00 %" in summary and "agree on 0.00 %" in summary
    # One CSV row per scored example: image i // 4 of the val shard, turned i % 4.
    rows = read_csv(result["files"]["images_csv"])
    assert [r["source_id"] for r in rows] == [f"val/{i:05d}.png" for i in range(3) for _ in range(4)]
    assert [r["true_angle"] for r in rows] == ["0", "90", "180", "270"] * 3
    assert {r["predicted_angle"] for r in rows} == {"90"}
    assert [r["correct"] for r in rows] == ["0", "1", "0", "0"] * 3
    assert float(rows[0]["confidence"]) == pytest.approx(0.6, abs=1e-6)


def test_evaluate_temperature_scaling_block_uses_the_fitted_temperature(tmp_path, records):
    """The "after" numbers of evaluate's temperature_scaling block, by hand: the
    model always says p = [0.1, 0.6, 0.2, 0.1] on 12 examples, 3 per label."""
    p = np.array([0.1, 0.6, 0.2, 0.1])
    model_dir = helpers.write_model_dir(str(tmp_path / "model"),
                                        helpers.fixed_output_model(S, p), S)
    ts = evaluation.evaluate(model_dir, records, split="val", batch_size=5, num_bins=10,
                             plots=False)["temperature_scaling"]
    # Balanced labels and one constant prediction: the NLL falls all the way to
    # uniform, so the fit ends at fit_temperature's upper bound, 20.
    t = ts["temperature"]
    assert t == pytest.approx(20.0, rel=1e-4)
    q = p ** (1 / t) / np.sum(p ** (1 / t))          # softmax(log p / T), by hand
    assert q.max() == pytest.approx(0.26494, abs=1e-4)
    assert ts["nll_before"] == pytest.approx(-np.mean(np.log(p)), rel=1e-6)
    assert ts["nll_after"] == pytest.approx(-np.mean(np.log(q)), rel=1e-6)
    # One confidence bin, accuracy 1/4 (always "90"): ECE = |0.25 - max q|.
    assert ts["ece_after"] == pytest.approx(q.max() - 0.25, abs=1e-6)
    # Every scaled confidence is below every summary threshold: all left alone.
    assert [(r["threshold"], r["left_alone"], r["error_acted"]) for r in ts["coverage_after"]] \
        == [(t_, 1.0, None) for t_ in evaluation.SUMMARY_THRESHOLDS]


def read_csv(path):
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_evaluate_perfect_and_upright_only_models_with_tta(tmp_path, records):
    perfect = serve.load_model_dir(helpers.write_model_dir(
        str(tmp_path / "perfect"), helpers.corner_model(S), S))
    result = evaluation.evaluate(str(tmp_path / "perfect"), records, tta=True, plots=False,
                                 predictor=perfect)
    assert result["accuracy"] == 1.0 and result["tta"]["accuracy"] == 1.0
    assert result["tta"]["agreement"] == 1.0
    assert result["confusion_matrix"] == [[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3]]

    # Knows only what upright looks like: plain accuracy suffers, but among the
    # four views exactly one is upright, and shifting it back names the label.
    model_dir = helpers.write_model_dir(str(tmp_path / "upright"),
                                        helpers.upright_only_model(S), S)
    result = evaluation.evaluate(model_dir, records, tta=True, plots=False)
    assert result["per_class_accuracy"]["0"] == 1.0
    assert result["accuracy"] < 1.0
    assert result["tta"]["accuracy"] == 1.0
    assert result["tta"]["per_class_accuracy"] == {"0": 1.0, "90": 1.0, "180": 1.0, "270": 1.0}
    # The per-image rows agree with the numbers above: upright always right,
    # and test-time agreement right everywhere.
    rows = read_csv(result["files"]["images_csv"])
    assert len(rows) == 12
    assert all(r["correct"] == "1" for r in rows if r["true_angle"] == "0")
    assert sum(r["correct"] == "1" for r in rows) / 12 == result["accuracy"]
    assert all(r["tta_correct"] == "1" and r["tta_predicted_angle"] == r["true_angle"]
               for r in rows)


def _evaluate_tool(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "upright.tools.evaluate", *args],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


def test_evaluate_tool_flags_reach_the_library(tmp_path, records):
    """--tta, --num_bins, --out and --plots on the command line give what
    evaluation.evaluate gives with those arguments, in the places they name."""
    model_dir = helpers.write_model_dir(str(tmp_path / "model"),
                                        helpers.upright_only_model(S), S)
    out = tmp_path / "elsewhere" / "scores.json"
    done = _evaluate_tool("--model", model_dir, "--records", records, "--batch_size", "5",
                          "--tta", "--num_bins", "7", "--out", str(out), "--plots")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    expected = evaluation.evaluate(model_dir, records, batch_size=5, tta=True, num_bins=7,
                                   out_json=str(tmp_path / "library" / "scores.json"),
                                   plots=True)
    assert {k: v for k, v in result.items() if k != "files"} == \
        json.loads(json.dumps({k: v for k, v in expected.items() if k != "files"}))
    assert result["calibration"]["num_bins"] == 7 and len(result["calibration"]["bins"]) == 7
    assert result["tta"]["accuracy"] == 1.0 and result["accuracy"] < 1.0
    assert sorted(os.listdir(out.parent)) == sorted(
        ["scores.json", "scores_coverage.json", "scores_images.csv", "scores_confusion.png",
         "scores_reliability.png", "scores_coverage.png"])
    assert not os.path.exists(os.path.join(model_dir, "eval_val.json"))
    assert done.stdout.strip() == evaluation.format_summary(result).strip()
    # The defaults: no test-time agreement, 15 bins, MODEL/eval_val.json; --noplots.
    done = _evaluate_tool("--model", model_dir, "--records", records, "--noplots")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(model_dir, "eval_val.json")) as f:
        result = json.load(f)
    assert "tta" not in result and result["calibration"]["num_bins"] == 15
    assert sorted(os.listdir(model_dir)) == ["eval_val.json", "eval_val_coverage.json",
                                             "eval_val_images.csv", "model.keras",
                                             "model_info.json"]


def test_evaluate_tool_bad_input_is_one_line(tmp_path, records):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "upright.tools.evaluate", "--model",
                           str(tmp_path / "nope"), "--records", records],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_names_a_damaged_shard(tmp_path, records):
    """Flipped bytes inside a val record (size unchanged, so info.json's size
    check passes): evaluate stops with the shard file and the record index."""
    import shutil
    from upright.pipeline import recordio
    damaged = tmp_path / "damaged"
    shutil.copytree(records, damaged)
    shard = recordio.shard_paths(str(damaged), "val")[0]
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0x5A
    open(shard, "wb").write(bytes(data))
    model_dir = helpers.write_model_dir(
        str(tmp_path / "model"), helpers.fixed_output_model(S, [0.1, 0.6, 0.2, 0.1]), S)
    with pytest.raises(recordio.RecordsError, match=r"val\.tfrecord-00000-of-00001: record \d is damaged"):
        evaluation.evaluate(model_dir, str(damaged), split="val", batch_size=5, plots=False)
