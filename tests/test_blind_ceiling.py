"""benchmarks/blind_ceiling.py: the sheets show the turns the key claims, and scoring is exact."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "blind_ceiling.py")
TILE, COLUMNS = 32, 4
# Where the bright top-left quadrant of the upright marker ends up, per edge
# that holds the picture's top after the turn (counter-clockwise turns move
# top-left -> bottom-left -> bottom-right -> top-right).
CORNER_TO_EDGE = {(0, 0): "top", (1, 0): "left", (1, 1): "bottom", (0, 1): "right"}


def run(*args):
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return done


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blind")
    records = str(tmp / "records")
    # Landscape images: the tiles must still come out square (as the model sees
    # them), or a tile's shape would tell the labeller whether the turn is odd.
    wide = [np.asarray(Image.fromarray(helpers.quadrant_marker_image(i)).resize((48, 32)))
            for i in range(10)]
    helpers.write_records(records, {"val": wide})
    done = run("make", "--records", records, "--out", str(tmp / "sheets"), "--key",
               str(tmp / "key.json"), "--num", "10", "--tile", str(TILE), "--columns",
               str(COLUMNS), "--per_sheet", "8", "--seed", "3", "--image_size", str(TILE))
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp


def read_tiles_from_sheets(tmp):
    """An 'oracle labeller': finds the bright quadrant of every tile on the sheets."""
    answers = []
    for sheet_index in (1, 2):
        sheet = np.asarray(Image.open(tmp / "sheets" / f"sheet{sheet_index}.png").convert("L"),
                           np.float32)
        for i in range(8 if sheet_index == 1 else 2):
            x, y = (i % COLUMNS) * (TILE + 12), (i // COLUMNS) * (TILE + 26) + 20
            tile = sheet[y:y + TILE, x:x + TILE]
            # The picture fills the square: no white sheet background inside.
            assert (tile >= 254).mean() < 0.01
            h = TILE // 2
            means = {(r, c): tile[r * h:(r + 1) * h, c * h:(c + 1) * h].mean()
                     for r in (0, 1) for c in (0, 1)}
            answers.append(CORNER_TO_EDGE[max(means, key=means.get)])
    return answers


def test_sheets_show_the_turns_in_the_key(made):
    key = json.loads((made / "key.json").read_text())
    tiles = key["tiles"]
    assert len(tiles) == 10 and {t["n"] for t in tiles} == set(range(1, 11))
    assert len({t["label"] for t in tiles}) > 1           # the turns are random
    # The key is not beside the sheets: the labeller must not see it.
    assert sorted(os.listdir(made / "sheets")) == ["sheet1.png", "sheet2.png"]
    oracle = read_tiles_from_sheets(made)
    assert oracle == [t["top_edge"] for t in tiles]
    (made / "oracle.txt").write_text("".join(f"#{i + 1} {e} sure\n" for i, e in enumerate(oracle)))
    done = run("score", "--key", str(made / "key.json"), "--answers", str(made / "oracle.txt"))
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0].split()
    assert first[:6] == ["all", "tiles", "10", "/", "10", "100.0"]


def test_score_counts_sure_and_groups_exactly(made, tmp_path):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import blind_ceiling
    finally:
        sys.path.pop(0)
    tiles = json.loads((made / "key.json").read_text())["tiles"]
    lines = []
    for t in tiles:   # right and sure on odd tiles, "top" and unsure on even ones
        lines.append(f"#{t['n']} {t['top_edge']} sure" if t["n"] % 2 else f"#{t['n']} top unsure")
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    # Group by the last digit of the record's index, 0-4 only: five groups of
    # one tile (ids val/00000.png .. val/00004.png) and the rest unmatched.
    result = blind_ceiling.score(str(made / "key.json"), str(tmp_path / "a.txt"),
                                 group_by=r"^val/\d{4}([0-4])\.png$")
    even_right = sum(t["top_edge"] == "top" for t in tiles if t["n"] % 2 == 0)
    assert result["sure"] == (5, 5)
    assert result["all"] == (5 + even_right, 10)
    expected = {}
    for t in tiles:
        index = int(t["source_id"][len("val/"):-len(".png")])
        group = str(index) if index <= 4 else "(no match)"
        right = int(t["n"] % 2 == 1 or t["top_edge"] == "top")
        c, n = expected.get(group, (0, 0))
        expected[group] = (c + right, n + 1)
    assert sorted(t["source_id"] for t in tiles) == [f"val/{i:05d}.png" for i in range(10)]
    assert result["groups"] == expected
    assert [n for _, n in expected.values()].count(1) == 5 and expected["(no match)"][1] == 5
    low, high = blind_ceiling.wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)
    assert blind_ceiling.wilson(0, 10)[0] == 0.0 and blind_ceiling.wilson(10, 10)[1] == 1.0
    # A malformed line names the file and line; a missing tile is an error too.
    (tmp_path / "bad.txt").write_text("#1 up sure\n")
    done = run("score", "--key", str(made / "key.json"), "--answers", str(tmp_path / "bad.txt"))
    assert done.returncode != 0 and "bad.txt:1" in done.stderr
    (tmp_path / "twice.txt").write_text("#1 top sure\n#1 left sure\n")
    done = run("score", "--key", str(made / "key.json"), "--answers", str(tmp_path / "twice.txt"))
    assert done.returncode != 0 and "twice.txt:2: tile #1 answered twice" in done.stderr
    (tmp_path / "short.txt").write_text("#1 top sure\n")
    done = run("score", "--key", str(made / "key.json"), "--answers", str(tmp_path / "short.txt"))
    assert done.returncode != 0 and "no answer for tiles [2" in done.stderr


def test_key_inside_the_sheets_folder_is_refused(tmp_path):
    done = run("make", "--records", str(tmp_path), "--out", str(tmp_path / "s"), "--key",
               str(tmp_path / "s" / "key.json"))
    assert done.returncode != 0 and "outside --out" in done.stderr
