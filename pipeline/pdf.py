"""PDF files in orient: render each page, predict, repair with /Rotate.

    orient --model documents scan.pdf --fix --dst out/

Reading: the whole file is checked before any page is looked at. It must start
with a %PDF- header and end with %%EOF (a cut-off download lacks it), not be
encrypted (repairs would have to be re-encrypted: decrypt first, e.g.
`qpdf --decrypt`), open in both libraries with the same number of pages, and
have at most `max_pages` pages. Otherwise `PdfError` says why in one line and
the file is skipped whole: nothing is written for it.

Prediction: pypdfium2 (PDFium, inside its wheel) renders each page as a viewer
shows it -- the page's current /Rotate (inherited or its own) applied, white
background -- with its longest side at `max_side` pixels, and the PNG goes
through the same path as an image file (imageio.read_upright, then the model's
preprocessing). So k is how far the page *as displayed* is turned
counter-clockwise, and the repair is k quarter turns clockwise.

Repair: /Rotate is "degrees the page is turned clockwise when displayed", so the
repaired page gets /Rotate = (current + 90 k) mod 360 (k = 0 and unsure pages
keep theirs). `rotate_pages` writes this with pypdf as an incremental update:
the original bytes are kept, byte for byte, as the first part of the output,
and only the changed page dictionaries (plus a cross-reference section) are
appended, so content streams, images, fonts, forms and signatures' byte ranges
are untouched.
"""
import io
import logging

from upright.pipeline import quiet

PDF_EXTENSIONS = frozenset({".pdf"})
DEFAULT_MAX_PAGES = 2000
# The spec puts %%EOF in the last 1024 bytes; a truncated file lacks it.
_TAIL = 1024


class PdfError(ValueError):
    """A PDF that is not processed (encrypted, damaged, too many pages): one line."""


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def open_pdf(data: bytes, *, max_pages: int = DEFAULT_MAX_PAGES):
    """-> the pypdfium2 PdfDocument of `data`, after the checks in the module
    docstring. Raises PdfError (one line) when the file is not to be processed,
    ImportError when the pdf extra is not installed."""
    import pypdf
    import pypdfium2 as pdfium
    if b"%PDF-" not in data[:_TAIL]:
        raise PdfError("damaged PDF: no %PDF- header; not processed")
    if b"%%EOF" not in data[-_TAIL:]:
        raise PdfError("damaged PDF: no %%EOF at the end (truncated?); not processed")
    with quiet.logger_level("pypdf", logging.ERROR):
        try:
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted:
                raise PdfError("encrypted PDF: not processed (decrypt it first, e.g. "
                               "qpdf --decrypt IN OUT)")
            pages = len(reader.pages)
        except PdfError:
            raise
        except Exception as e:  # pypdf raises many types for a damaged file
            raise PdfError(f"damaged PDF: {type(e).__name__}: {_first_line(e)}; "
                           "not processed") from None
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        raise PdfError(f"damaged PDF: {_first_line(e)}; not processed") from None
    if len(document) != pages:
        document.close()
        raise PdfError(f"damaged PDF: {pages} pages for pypdf, {len(document)} for PDFium; "
                       "not processed")
    if pages > max_pages:
        document.close()
        raise PdfError(f"huge PDF: {pages} pages, over the limit of {max_pages} "
                       "(--max_pdf_pages); not processed")
    if pages == 0:
        document.close()
        raise PdfError("empty PDF: no pages")
    return document


def render_page(document, index: int, max_side: int) -> tuple:
    """-> (PNG bytes of page `index` as displayed, longest side max_side pixels,
    its current /Rotate in degrees)."""
    page = document[index]
    try:
        width, height = page.get_size()   # points, with /Rotate applied
        scale = max_side / max(width, height, 1e-6)
        image = page.render(scale=scale, fill_color=(255, 255, 255, 255)).to_pil()
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG", compress_level=1)
        return buffer.getvalue(), int(page.get_rotation()) % 360
    finally:
        page.close()


def rotate_pages(data: bytes, rotations: dict) -> bytes:
    """The PDF `data` with /Rotate of page i (0-based) set to rotations[i]
    (multiples of 90), as an incremental update: the output starts with `data`
    unchanged."""
    import pypdf
    from pypdf.generic import NameObject, NumberObject
    with quiet.logger_level("pypdf", logging.ERROR):
        writer = pypdf.PdfWriter(io.BytesIO(data), incremental=True)
        for index, degrees in sorted(rotations.items()):
            if degrees % 90:
                raise ValueError(f"/Rotate must be a multiple of 90, got {degrees}")
            writer.pages[index][NameObject("/Rotate")] = NumberObject(degrees % 360)
        out = io.BytesIO()
        writer.write(out)
    payload = out.getvalue()
    if not payload.startswith(data):
        raise RuntimeError("the incremental update changed the original bytes")
    return payload
