"""orient: predictions on real files, upright copies (lossless JPEG), EXIF, reruns."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from upright.pipeline import evaluation, orient, serve, upright_copy
from tests import helpers

S = 16
JPEGTRAN = shutil.which("jpegtran")


def decode(path_or_bytes):
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else open(path_or_bytes, "rb").read()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def save(path, array, fmt="jpeg", exif_orientation=None, **kwargs):
    image = Image.fromarray(array)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[upright_copy.EXIF_ORIENTATION] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    image.save(path, "JPEG" if fmt == "jpeg" else "PNG",
               **({"quality": 92} if fmt == "jpeg" else {}), **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model_dir = helpers.write_model_dir(str(tmp_path_factory.mktemp("model")),
                                        helpers.corner_model(S), S)
    return serve.load_model_dir(model_dir)


def config(tmp_path, paths, **kwargs):
    kwargs.setdefault("progress", False)
    return orient.OrientConfig(model_dir=str(tmp_path / "unused"), paths=tuple(paths), **kwargs)


@pytest.mark.parametrize("lossless", [True, False])
def test_fix_turns_back_upright_leaves_unsure_alone_and_skips_bad_files(
        tmp_path, predictor, lossless):
    if lossless and not JPEGTRAN:
        pytest.skip("jpegtran not installed (apt-get install libjpeg-turbo-progs)")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    upright = helpers.quadrant_marker_image(0, 64)
    save(src / "turned90.jpg", np.rot90(upright, 1))
    save(src / "sub" / "turned180.png", np.rot90(helpers.quadrant_marker_image(1, 40), 2), "png")
    save(src / "upright.jpg", upright)
    save(src / "gray.png", np.full((32, 32, 3), 128, np.uint8), "png")
    (src / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (src / "truncated.jpg").write_bytes(helpers.encode(upright)[:300])
    (src / "notes.txt").write_text("not an image, not listed")
    dst = tmp_path / "dst"
    report = tmp_path / "report.csv"
    cfg = config(tmp_path, [str(src)], fix=True, dst=str(dst), report=str(report),
                 batch_size=4, lossless=lossless)
    result = orient.run(cfg, predictor=predictor)
    rows = {os.path.relpath(r["path"], src): r for r in result["rows"]}
    assert set(rows) == {"turned90.jpg", "sub/turned180.png", "upright.jpg", "gray.png",
                         "garbage.jpg", "truncated.jpg"}

    row = rows["turned90.jpg"]
    assert (row["action"], row["angle_ccw"], row["repair_cw"]) == ("turn", 90, 90)
    assert row["confidence"] > 0.99
    source = decode(str(src / "turned90.jpg"))
    fixed = decode(str(dst / "turned90.jpg"))
    assert fixed.shape == (64, 64, 3)
    if lossless:
        assert row["method"] == "lossless (jpegtran)"
        # Lossless: turning the copy back in the DCT domain restores the source's
        # coefficients, so it decodes to exactly the source's pixels. (Decoded
        # pixels of a DCT-domain turn match np.rot90 of the decoded source only to
        # within the decoder's integer-IDCT rounding, a few levels.)
        back = subprocess.run([JPEGTRAN, "-rotate", "270", "-perfect", str(dst / "turned90.jpg")],
                              capture_output=True, check=True).stdout
        np.testing.assert_array_equal(decode(back), source)
        assert np.abs(fixed.astype(int) - np.rot90(source, -1)).max() <= 8
    else:
        assert row["method"].startswith("re-encoded (JPEG quality 95)")
        assert np.abs(fixed.astype(int) - np.rot90(source, -1)).mean() < 3
    # The copy is upright: the model says so too.
    assert np.argmax(predictor.predict_images(predictor.preprocess(
        (dst / "turned90.jpg").read_bytes())[None])) == 0

    # PNG: re-encoded losslessly, exact pixels, same relative path.
    assert rows["sub/turned180.png"]["repair_cw"] == 180
    np.testing.assert_array_equal(decode(str(dst / "sub" / "turned180.png")),
                                  helpers.quadrant_marker_image(1, 40))
    # Upright and unsure images are left alone: nothing written.
    assert rows["upright.jpg"]["action"] == "none"
    assert rows["gray.png"]["action"] == "unsure" and rows["gray.png"]["confidence"] < 0.5
    assert not (dst / "upright.jpg").exists() and not (dst / "gray.png").exists()
    assert result["summary"]["unsure_files"] == [str(src / "gray.png")]
    # Bad files: reported, skipped, not fatal.
    assert rows["garbage.jpg"]["status"] == "error"
    assert rows["garbage.jpg"]["message"].startswith("not an image")
    assert rows["truncated.jpg"]["status"] == "error"
    assert result["summary"]["errors"] == 2 and result["summary"]["written"] == 2
    # The PNG copy keeps every pixel, so it counts as lossless with jpegtran's turn.
    assert rows["sub/turned180.png"]["method"] == "re-encoded (PNG, lossless)"
    assert result["summary"]["lossless"] == (2 if lossless else 1)

    with open(report) as f:
        csv_rows = {os.path.relpath(r["path"], src): r for r in csv.DictReader(f)}
    assert csv_rows["turned90.jpg"]["repair_cw"] == "90"
    assert csv_rows["gray.png"]["action"] == "unsure"
    table = orient.format_table(result["rows"])
    assert "turn 90cw" in table and "unsure" in table

    # A rerun skips what is done and rewrites nothing.
    mtime = os.stat(dst / "turned90.jpg").st_mtime_ns
    again = orient.run(cfg, predictor=predictor)
    again_rows = {os.path.relpath(r["path"], src): r for r in again["rows"]}
    assert again_rows["turned90.jpg"]["status"] == "done"
    assert again_rows["sub/turned180.png"]["status"] == "done"
    assert os.stat(dst / "turned90.jpg").st_mtime_ns == mtime
    # ...but redoes a file whose copy was removed.
    os.remove(dst / "turned90.jpg")
    third = orient.run(cfg, predictor=predictor)
    third_rows = {os.path.relpath(r["path"], src): r for r in third["rows"]}
    assert third_rows["turned90.jpg"]["status"] == "ok"
    assert (dst / "turned90.jpg").exists()


def test_exif_tag_disagreement_is_flagged_and_the_copy_keeps_metadata(tmp_path, predictor):
    upright = helpers.quadrant_marker_image(2, 64)
    src = tmp_path / "src"
    src.mkdir()
    # Pixels stored upright, but a tag that tells viewers to turn them 90 cw:
    # what a person sees is turned, and the tag is wrong.
    wrong = save(src / "wrong_tag.jpg", upright, exif_orientation=6)
    # Pixels stored turned 90 ccw with the tag that correctly turns them back.
    right = save(src / "right_tag.jpg", np.rot90(upright, 1), exif_orientation=6)
    dst = tmp_path / "dst"
    result = orient.run(config(tmp_path, [wrong, right], fix=True, dst=str(dst),
                               report=str(tmp_path / "r.json"), lossless=bool(JPEGTRAN)),
                        predictor=predictor)
    rows = {os.path.basename(r["path"]): r for r in result["rows"]}
    assert rows["wrong_tag.jpg"]["exif_orientation"] == 6
    assert rows["wrong_tag.jpg"]["angle_ccw"] == 270 and rows["wrong_tag.jpg"]["exif_disagrees"]
    assert rows["right_tag.jpg"]["action"] == "none"
    assert not rows["right_tag.jpg"]["exif_disagrees"]
    # The copy: the stored (upright) pixels, tag reset to 1, other metadata kept.
    with Image.open(dst / "wrong_tag.jpg") as im:
        assert im.getexif()[upright_copy.EXIF_ORIENTATION] == 1
        fixed = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    source = decode(wrong)
    if JPEGTRAN:
        np.testing.assert_array_equal(fixed, source)   # identity transform, lossless
    else:
        assert np.abs(fixed.astype(int) - source).mean() < 3
    with open(tmp_path / "r.json") as f:
        assert json.load(f)["summary"]["exif_disagrees"] == 1


def jpegtran(data: bytes, *args) -> bytes:
    return subprocess.run([JPEGTRAN, *args], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.skipif(not JPEGTRAN, reason="jpegtran not installed")
def test_jpeg_whose_size_is_not_whole_blocks_is_turned_losslessly_with_the_edge_trimmed(
        tmp_path, predictor):
    # Stored 56 x 40 with 4:2:0 chroma (16 x 16 blocks): a partial block row of
    # 8 pixels at the bottom, which a 90 degree clockwise turn moves to the
    # left edge, where JPEG cannot hold a partial block.
    path = save(tmp_path / "odd.jpg", np.rot90(helpers.quadrant_marker_image(3, 64)[:56, :40], 1))
    data = open(path, "rb").read()
    result = orient.run(config(tmp_path, [path], fix=True, dst=str(tmp_path / "dst")),
                        predictor=predictor)
    row = result["rows"][0]
    assert row["status"] == "ok" and row["repair_cw"] == 90
    assert row["method"] == "lossless (jpegtran), 8 px trimmed from the left edge (56x40 -> 32x56)"
    assert result["summary"]["lossless"] == result["summary"]["lossless_trimmed"] == 1
    assert "lossless: 1, 1 of them with a partial edge block trimmed" in \
        orient.format_summary(result["summary"])
    copy = open(tmp_path / "dst" / "odd.jpg", "rb").read()
    # Exact: the copy holds the source's DCT blocks, moved. Turned back, it
    # decodes to exactly the source cut (losslessly, at a block boundary) to
    # the 56 x 32 that was kept.
    kept = jpegtran(data, "-crop", "56x32+0+0")
    np.testing.assert_array_equal(decode(jpegtran(copy, "-perfect", "-rotate", "270")),
                                  decode(kept))
    # As pixels: np.rot90 of the decoded source without its left 8 columns,
    # within the decoder's rounding (integer IDCT on transposed blocks, chroma
    # upsampling at the new edge); the wrong strip would be far off.
    fixed = decode(copy).astype(int)
    turned = np.rot90(decode(path), -1).astype(int)
    assert fixed.shape == (56, 32, 3)
    assert np.abs(fixed - turned[:, 8:]).mean() < 1.0
    assert np.abs(fixed - turned[:, :32]).mean() > 10.0

    # trim_edges off: every pixel kept, so the JPEG is re-encoded, and the
    # line says why.
    result = orient.run(config(tmp_path, [path], fix=True, dst=str(tmp_path / "keep"),
                               trim_edges=False), predictor=predictor)
    assert result["rows"][0]["method"] == ("re-encoded (JPEG quality 95); jpegtran refused: "
                                           "transformation is not perfect (trim_edges off: "
                                           "every pixel kept)")
    fixed = decode(str(tmp_path / "keep" / "odd.jpg"))
    assert fixed.shape == (56, 40, 3)
    assert np.abs(fixed.astype(int) - np.rot90(decode(path), -1)).mean() < 3

    # A size of whole blocks: -perfect, nothing trimmed.
    whole = save(tmp_path / "whole.jpg", np.rot90(helpers.quadrant_marker_image(3, 64)[:48], 1))
    result = orient.run(config(tmp_path, [whole], fix=True, dst=str(tmp_path / "whole")),
                        predictor=predictor)
    assert result["rows"][0]["method"] == "lossless (jpegtran)"
    assert result["summary"]["lossless_trimmed"] == 0
    copy = open(tmp_path / "whole" / "whole.jpg", "rb").read()
    assert decode(copy).shape == (48, 64, 3)
    np.testing.assert_array_equal(decode(jpegtran(copy, "-perfect", "-rotate", "270")),
                                  decode(whole))


def test_without_jpegtran_the_fallback_is_explained_once(tmp_path, predictor):
    src = tmp_path / "src"
    src.mkdir()
    for k in (1, 2, 3):
        save(src / f"t{k}.jpg", np.rot90(helpers.quadrant_marker_image(k, 48)[:40], k))
    result = orient.run(config(tmp_path, [str(src)], fix=True, dst=str(tmp_path / "dst"),
                               jpegtran="no-such-jpegtran-here"), predictor=predictor)
    assert [r["method"] for r in result["rows"]] == ["re-encoded (JPEG quality 95)"] * 3
    text = orient.format_summary(result["summary"])
    assert text.count("jpegtran") == 1
    assert "jpegtran is not installed, so JPEGs were re-encoded (install libjpeg-turbo-progs" \
        in text
    result = orient.run(config(tmp_path, [str(src)], fix=True, dst=str(tmp_path / "dst2"),
                               lossless=False), predictor=predictor)
    assert "JPEGs re-encoded (--nolossless)" in orient.format_summary(result["summary"])


def test_corrupt_exif_is_a_note_of_the_file_not_a_warning(tmp_path, predictor, capfd):
    """Pillow's 'Corrupt EXIF data' UserWarning (no file name, through the
    progress bar) becomes the file's note and a count; the image is still
    predicted and turned."""
    upright = helpers.quadrant_marker_image(5, 64)[:, :56]   # 56 = 3.5 blocks of 16
    path = tmp_path / "src" / "bad exif.jpg"
    path.parent.mkdir()
    path.write_bytes(helpers.with_corrupt_exif(helpers.encode(np.rot90(upright, 1), quality=92)))
    save(tmp_path / "src" / "clean.jpg", np.rot90(upright, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = orient.run(config(tmp_path, [str(tmp_path / "src")], fix=True,
                                   dst=str(tmp_path / "dst"), lossless=bool(JPEGTRAN)),
                            predictor=predictor)
    assert [str(w.message) for w in caught] == []
    assert "EXIF" not in capfd.readouterr().err
    rows = {os.path.basename(r["path"]): r for r in result["rows"]}
    bad, clean = rows["bad exif.jpg"], rows["clean.jpg"]
    assert (bad["status"], bad["action"], bad["repair_cw"]) == ("ok", "turn", 90)
    assert bad["message"] == "corrupt EXIF data ignored"
    assert clean["message"] is None
    assert result["summary"]["corrupt_exif_ignored"] == 1
    with warnings.catch_warnings(record=True):   # the copy keeps the damaged block
        warnings.simplefilter("always")
        fixed = decode(str(tmp_path / "dst" / "bad exif.jpg"))
        source = decode(str(path))
    turned = np.rot90(source, -1)
    if JPEGTRAN:   # the partial block row, turned to the left edge, is trimmed
        assert bad["method"].startswith("lossless (jpegtran), 8 px trimmed from the left edge")
        turned = turned[:, 8:]
    assert np.abs(fixed.astype(int) - turned).mean() < 3
    table = orient.format_table(result["rows"])
    assert "corrupt EXIF data ignored" in next(line for line in table.splitlines()
                                               if "bad exif.jpg" in line)
    assert "1 with corrupt EXIF data (ignored" in orient.format_summary(result["summary"])


def test_config_errors_are_clear(tmp_path, predictor):
    with pytest.raises(orient.OrientError, match="--dst"):
        orient.run(config(tmp_path, [str(tmp_path)], fix=True), predictor=predictor)
    with pytest.raises(orient.OrientError, match="source folder"):
        orient.run(config(tmp_path, [str(tmp_path)], fix=True, dst=str(tmp_path)),
                   predictor=predictor)
    with pytest.raises(orient.OrientError, match="no such file"):
        orient.run(config(tmp_path, [str(tmp_path / "missing")]), predictor=predictor)


def test_orient_tool_end_to_end(tmp_path):
    model_dir = helpers.write_model_dir(str(tmp_path / "model"), helpers.corner_model(S), S)
    image = save(tmp_path / "a.png", np.rot90(helpers.quadrant_marker_image(4, 32), 3), "png")
    proc = subprocess.run([sys.executable, "-m", "upright.tools.orient", "--model", model_dir,
                           image, "--report", str(tmp_path / "r.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "turn 270cw" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "upright.tools.orient", "--model", model_dir,
                           str(tmp_path), "--fix"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("orient: error: fix needs")


def test_tta_combines_the_four_turns_and_repairs_what_a_biased_model_misses(tmp_path):
    """upright_only_model only knows the upright marker: alone it calls every
    turned file upright (or is unsure); over the four turns of each file it is
    right on all of them."""
    model_dir = helpers.write_model_dir(str(tmp_path / "model"),
                                        helpers.upright_only_model(S, scale=0.2), S)
    biased = serve.load_model_dir(model_dir)
    src = tmp_path / "src"
    src.mkdir()
    for k in range(4):
        save(src / f"turned{k}.png", np.rot90(helpers.quadrant_marker_image(k, 32), k), "png")

    def predicted(tta):
        result = orient.run(config(tmp_path, [str(src)], tta=tta, min_confidence=0.0),
                            predictor=biased)
        return {os.path.basename(r["path"]): r["angle_ccw"] for r in result["rows"]}

    truth = {f"turned{k}.png": 90 * k for k in range(4)}
    assert predicted(tta=False) != truth
    assert predicted(tta=True) == truth
    # The combination is evaluation's: orient.predict equals combine_rotations.
    images = np.stack([biased.preprocess(open(src / f"turned{k}.png", "rb").read())
                       for k in range(4)])
    by_turn = [biased.predict_images(np.rot90(images, j, axes=(1, 2)).copy())
               for j in range(4)]
    np.testing.assert_allclose(
        orient.predict(biased, images, config(tmp_path, [str(src)], tta=True)),
        evaluation.combine_rotations(by_turn)[0], atol=1e-6)


def test_long_paths_are_shortened_in_the_middle():
    path = "/data/photos/2019/summer-holidays/camera-roll/IMG_20190704_181523.jpg"
    short = orient.shorten_middle(path, 48)
    assert len(short) == 48 and short.startswith("/data/photos/2019/summ")
    assert short.endswith("IMG_20190704_181523.jpg") and "..." in short
    assert orient.shorten_middle("short.jpg", 48) == "short.jpg"
    assert orient.shorten_middle("abcdefghij", 9) == "abc...hij"
