"""orient on PDFs: pages rendered and predicted, repairs written as /Rotate in an
incremental update (original bytes and content streams untouched), unsure pages
left alone, encrypted / damaged / over-long PDFs refused in one line each."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pypdf = pytest.importorskip("pypdf")
pdfium = pytest.importorskip("pypdfium2")

from upright.pipeline import orient, pdf, serve  # noqa: E402
from tests import helpers  # noqa: E402

S = 16
# Page content turned k quarter turns counter-clockwise, the page's own /Rotate
# in the source, and the /Rotate the repaired page must carry.
#   page 5: content turned 90 ccw shown with /Rotate 180 -> seen turned 270 ccw
#   (k = 3), repaired by 270 cw: (180 + 270) % 360 = 90, which shows it upright.
PAGES = [  # (content k, source /Rotate, expected /Rotate, expected action)
    (0, 0, 0, "none"),
    (1, 0, 90, "turn"),
    (2, 0, 180, "turn"),
    (None, 0, 0, "unsure"),   # gray page: no marker, confidence about 0.25
    (0, 90, 0, "turn"),
    (1, 180, 90, "turn"),
]


def page_image(content_k, seed):
    if content_k is None:
        return Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    return Image.fromarray(np.ascontiguousarray(
        np.rot90(helpers.quadrant_marker_image(seed, 64), content_k)))


def make_pdf(pages=PAGES) -> bytes:
    """A PDF made by Pillow (one image per page), then /Rotate set by pypdf."""
    images = [page_image(k, seed) for seed, (k, _, _, _) in enumerate(pages)]
    buffer = io.BytesIO()
    images[0].save(buffer, "PDF", save_all=True, append_images=images[1:])
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(buffer.getvalue())))
    for page, (_, rotate, _, _) in zip(writer.pages, pages):
        if rotate:
            page.rotation = rotate
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def encrypted_pdf() -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf(PAGES[:2]))))
    writer.encrypt("secret")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def content_bytes(page) -> list:
    """Raw (still encoded) bytes of a page's content streams and image XObjects."""
    contents = page["/Contents"].get_object()
    streams = list(contents) if isinstance(contents, pypdf.generic.ArrayObject) else [contents]
    out = [s.get_object()._data for s in streams]
    for _, xobject in sorted(page["/Resources"]["/XObject"].items()):
        out.append(xobject.get_object()._data)
    return out


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    model_dir = helpers.write_model_dir(str(tmp_path_factory.mktemp("model")),
                                        helpers.corner_model(S), S)
    return serve.load_model_dir(model_dir)


def run(tmp_path, paths, predictor, **kwargs):
    cfg = orient.OrientConfig(model_dir="unused", paths=tuple(map(str, paths)), progress=False,
                              **kwargs)
    return orient.run(cfg, predictor=predictor)


def test_pdf_pages_get_their_repair_as_rotate_and_nothing_else_changes(tmp_path, predictor):
    src = tmp_path / "src"
    src.mkdir()
    source = make_pdf()
    (src / "scan.pdf").write_bytes(source)
    dst = tmp_path / "out"
    # batch_size 4 < 6 pages: pages are predicted in two batches.
    result = run(tmp_path, [src], predictor, fix=True, dst=str(dst), batch_size=4)
    rows = result["rows"]
    assert [r["path"] for r in rows] == [f"{src / 'scan.pdf'}#page={i + 1}"
                                         for i in range(len(PAGES))]
    assert [r["action"] for r in rows] == [p[3] for p in PAGES]
    assert [r["angle_ccw"] for r in rows if r["action"] != "unsure"] == [0, 90, 180, 270, 270]
    assert result["summary"]["unsure_files"] == [f"{src / 'scan.pdf'}#page=4"]
    assert rows[1]["method"] == "lossless (/Rotate 0 -> 90)"
    assert rows[5]["method"] == "lossless (/Rotate 180 -> 90)"

    output = (dst / "scan.pdf").read_bytes()
    # Incremental update: the source, byte for byte, then the changes.
    assert output.startswith(source) and len(output) > len(source)
    before, after = pypdf.PdfReader(io.BytesIO(source)), pypdf.PdfReader(io.BytesIO(output))
    assert [p.rotation for p in after.pages] == [p[2] for p in PAGES]
    for a, b in zip(before.pages, after.pages):
        assert content_bytes(a) == content_bytes(b)
        assert a.mediabox == b.mediabox
    # As a viewer shows it, every page with a marker is now upright.
    document = pdfium.PdfDocument(output)
    for index, (k, _, _, _) in enumerate(PAGES):
        png, _ = pdf.render_page(document, index, 64)
        probs = predictor.predict_images(predictor.preprocess(png)[None])[0]
        if k is not None:
            assert probs.argmax() == 0, index
    document.close()

    # A rerun skips the PDF and rewrites nothing.
    mtime = os.stat(dst / "scan.pdf").st_mtime_ns
    again = run(tmp_path, [src], predictor, fix=True, dst=str(dst))
    assert {r["status"] for r in again["rows"]} == {"done"}
    assert [r["angle_ccw"] for r in again["rows"] if r["action"] == "turn"] == [90, 180, 270, 270]
    assert os.stat(dst / "scan.pdf").st_mtime_ns == mtime


def test_pdf_with_nothing_to_turn_is_not_written(tmp_path, predictor):
    path = tmp_path / "upright.pdf"
    path.write_bytes(make_pdf([PAGES[0], PAGES[3]]))
    result = run(tmp_path, [path], predictor, fix=True, dst=str(tmp_path / "out"))
    assert [r["action"] for r in result["rows"]] == ["none", "unsure"]
    assert not (tmp_path / "out" / "upright.pdf").exists()


def test_encrypted_damaged_and_huge_pdfs_one_line_each_nothing_written(tmp_path, predictor):
    src = tmp_path / "src"
    src.mkdir()
    good = make_pdf(PAGES[:3])
    (src / "a_encrypted.pdf").write_bytes(encrypted_pdf())
    (src / "b_truncated.pdf").write_bytes(good[:len(good) // 2])
    (src / "c_tail_cut.pdf").write_bytes(good[:-10])
    (src / "d_not_a_pdf.pdf").write_bytes(b"hello")
    (src / "e_huge.pdf").write_bytes(good)
    dst = tmp_path / "out"
    result = run(tmp_path, [src], predictor, fix=True, dst=str(dst), max_pdf_pages=2)
    rows = {os.path.basename(r["path"]): r for r in result["rows"]}
    assert len(result["rows"]) == 5   # one row per refused file, no page rows
    expected = {"a_encrypted.pdf": "encrypted PDF: not processed",
                "b_truncated.pdf": "damaged PDF: no %%EOF at the end (truncated?)",
                "c_tail_cut.pdf": "damaged PDF:",
                "d_not_a_pdf.pdf": "damaged PDF: no %PDF- header",
                "e_huge.pdf": "huge PDF: 3 pages, over the limit of 2"}
    for name, start in expected.items():
        row = rows[name]
        assert row["status"] == "error" and row["action"] == "skip", name
        assert row["message"].startswith(start) and "\n" not in row["message"], row["message"]
    assert not dst.exists() or not [f for f in os.listdir(dst) if not f.startswith(".")]
    assert result["summary"]["errors"] == 5


def test_orient_tool_on_pdfs(tmp_path):
    model_dir = helpers.write_model_dir(str(tmp_path / "model"), helpers.corner_model(S), S)
    (tmp_path / "scan.pdf").write_bytes(make_pdf(PAGES[:2]))
    (tmp_path / "locked.pdf").write_bytes(encrypted_pdf())
    proc = subprocess.run([sys.executable, "-m", "upright.tools.orient", "--model", model_dir,
                           str(tmp_path / "scan.pdf"), str(tmp_path / "locked.pdf"),
                           "--fix", "--dst", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert sum("encrypted PDF: not processed" in line for line in lines) == 1
    assert any("scan.pdf#page=2" in line and "turn 90cw" in line for line in lines)
    after = pypdf.PdfReader(str(tmp_path / "out" / "scan.pdf"))
    assert [p.rotation for p in after.pages] == [0, 90]
    assert not (tmp_path / "out" / "locked.pdf").exists()
