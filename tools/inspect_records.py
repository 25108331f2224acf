"""inspect_records: check a records folder record by record, and look at it.

    inspect_records records/photos
    inspect_records records/photos --contact_sheet=sheet.png --contact_sheet_images=8

Reads every record of every shard listed in OUT/info.json and checks them
against it: schema version and rotation convention, the shard list, the number
of records per shard and per split, that every image decodes (with
TensorFlow's decoder) to 3 channels at its stated height and width, and that
no image (sha256) appears twice. Prints a summary and exits 0, or prints the
first problem, naming the shard file, and exits 1. A truncated or corrupted
shard gives an error at the damaged record, never a hang.

--contact_sheet draws sample images from train and val, each in its four
orientations (label k = turned k quarter turns counter-clockwise), so that a
person can see what the model will be shown.
"""
import json
import sys

from absl import app
from absl import flags

from upright import tools

_CONTACT_SHEET = flags.DEFINE_string(
    "contact_sheet", None, "Also write a PNG grid of sample images, each in its four "
    "labelled orientations, to this file.")
_CONTACT_SHEET_IMAGES = flags.DEFINE_integer(
    "contact_sheet_images", 6, "Number of sample images (rows) on the contact sheet.")
_JSON = flags.DEFINE_boolean("json", False, "Print the summary as JSON.")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("give exactly one records folder: inspect_records OUT")
    records_dir = argv[1]
    from upright.pipeline import recordio, records_inspect
    try:
        summary = records_inspect.inspect_records(records_dir)
        if _CONTACT_SHEET.value:
            drawn = records_inspect.draw_contact_sheet(records_dir, _CONTACT_SHEET.value,
                                                       num_images=_CONTACT_SHEET_IMAGES.value)
            summary["contact_sheet"] = {"path": _CONTACT_SHEET.value, "images": drawn}
    except recordio.RecordsError as e:
        print(f"inspect_records: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"inspect_records: error: {e}", file=sys.stderr)
        sys.exit(1)
    if _JSON.value:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    for split, entry in summary["splits"].items():
        print(f"{split}: {entry['num_examples']} records in {entry['num_shards']} shard(s), "
              f"{entry['bytes'] / 1e6:.1f} MB")
    print(f"formats: {summary['formats']}")
    if "stored_height" in summary:
        h, w = summary["stored_height"], summary["stored_width"]
        print(f"stored height {h['min']}..{h['max']} (median {h['median']}), "
              f"width {w['min']}..{w['max']} (median {w['median']})")
    if "contact_sheet" in summary:
        print(f"contact sheet: {summary['contact_sheet']['path']} "
              f"({summary['contact_sheet']['images']} images x 4 orientations)")
    print(f"OK: every record of {records_dir} matches info.json")


def run():
    tools.run_tool(main, __name__)


if __name__ == "__main__":
    run()
