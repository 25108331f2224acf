"""upright.tools: the command-line tools, one thin absl module per command.

Every tool starts through `run_tool`, which gives all of them the same manners:
`-h`/`--help` print the tool's docstring and flags and exit 0; a usage error
(a bad or missing flag, a missing flagfile, a UsageError from main) is one
`TOOL: error: ...` line, then a short usage line, exit 2; TensorFlow's C++
start-up lines are not shown unless `-v 1` (or more) is given.
"""
import contextlib
import os
import re
import sys
import tempfile

# TensorFlow's C++ log lines (oneDNN, CPU features, CUDA probes, converter
# chatter) drown the tools' own output; errors still show. A user's explicit
# setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One line of TensorFlow's native logging: "I0000 00:00:1796.. 15737 port.cc:153] ...",
# and the notice abseil prints before its logging is initialised.
_NATIVE_LOG_LINE = re.compile(rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]]+\] |"
                              rb"WARNING: All log messages before absl::InitializeLog\(\))")


@contextlib.contextmanager
def native_startup_hidden(show: bool = False):
    """Runs the body with file descriptor 2 sent to a temporary file, then
    writes back every captured line that is not a native log line (all of them
    when `show`). TensorFlow prints its start-up lines from C++ before abseil's
    logging is initialised, where TF_CPP_MIN_LOG_LEVEL does not reach them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True)
                    if show or not _NATIVE_LOG_LINE.match(line)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


def import_tensorflow(show_native_logs: bool = False):
    """Imports TensorFlow and initialises its devices with the C++ start-up
    lines hidden (see native_startup_hidden); returns the module."""
    with native_startup_hidden(show_native_logs):
        import tensorflow as tf
        tf.config.list_physical_devices()   # the CUDA probe logs here, once
    if not show_native_logs:
        # TensorFlow's Python INFO lines (SavedModel signature renames, saver
        # timings, "Using new converter") are for its developers; some go
        # through TensorFlow's logger, some straight through absl's.
        from absl import logging
        tf.get_logger().setLevel("WARNING")
        logging.set_verbosity(logging.WARNING)
    return tf


def _tool_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def _usage_line(module) -> str:
    """The first example command of the tool's docstring."""
    for line in (module.__doc__ or "").splitlines()[1:]:
        if line.startswith("    ") and line.strip():
            return line.strip()
    return _tool_name(module.__name__)


def fail_usage(module_name: str, message: str) -> None:
    """Ends the tool as a usage error: one error line, a usage line, exit 2."""
    name = _tool_name(module_name)
    module = sys.modules[module_name]
    print(f"{name}: error: {message}", file=sys.stderr)
    print(f"usage: {_usage_line(module)}   (all flags: {name} --help)", file=sys.stderr)
    sys.exit(2)


def run_tool(main, module_name: str, *, tensorflow: bool = True) -> None:
    """app.run(main) for a console-script entry point, with the manners above.

    absl's --help shows the docstring of __main__ and the key flags of the module
    named by sys.argv[0]. Under an installed console script both are pip's
    wrapper, so the tool lends them its own docstring and flags first.
    `tensorflow`: import TensorFlow quietly before main (tools that use it).
    """
    from absl import app, flags
    module = sys.modules[module_name]
    main_module = sys.modules["__main__"]
    if main_module is not module:
        main_module.__doc__ = module.__doc__
        for flag in flags.FLAGS.get_key_flags_for_module(module_name):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    argv = list(sys.argv)
    options = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(a in ("-h", "--help", "--helpshort", "-?") for a in options):
        app.define_help_flags()
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    if "--helpfull" in options:
        app.define_help_flags()
        app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)

    def parse(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            message = re.sub(r"^ERROR:+\s*", "", str(e).replace("\n", " "))
            fail_usage(module_name, message)

    def quiet_main(args):
        if tensorflow:
            import_tensorflow(show_native_logs=flags.FLAGS["verbosity"].value >= 1)
        try:
            return main(args)
        except app.UsageError as e:
            fail_usage(module_name, str(e))

    app.run(quiet_main, argv=argv, flags_parser=parse)
