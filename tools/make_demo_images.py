"""make_demo_images: write built-in demo data, upright scenes drawn on the fly.

No downloads: the scenes are drawn with Pillow (pipeline/demo.py). They are
the demo's stand-in for a user's folder of upright photos.

    make_demo_images --out demo_data/scenes --count 600 --seed 0
    make_records --src demo_data/scenes
"""
import sys

from absl import app
from absl import flags

from upright import tools

from upright.pipeline import demo

_OUT = flags.DEFINE_string("out", "demo_data/scenes", "Folder to write the JPEG scenes into.")
_COUNT = flags.DEFINE_integer("count", 600, "Number of scenes.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed; the same seed gives the same files.")
_MIN_SIDE = flags.DEFINE_integer("min_side", 160, "Smallest longest side, pixels.", lower_bound=32)
_MAX_SIDE = flags.DEFINE_integer("max_side", 360, "Largest longest side, pixels.", lower_bound=32)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _MIN_SIDE.value > _MAX_SIDE.value:
        raise app.UsageError("--min_side must not exceed --max_side")
    paths = demo.make_demo_images(_OUT.value, count=_COUNT.value, seed=_SEED.value,
                                  min_side=_MIN_SIDE.value, max_side=_MAX_SIDE.value)
    print(f"wrote {len(paths)} upright demo scenes to {_OUT.value}", file=sys.stderr)


def run():
    tools.run_tool(main, __name__, tensorflow=False)


if __name__ == "__main__":
    run()
