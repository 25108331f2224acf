"""Keeping library chatter off the user's console, for one block of code.

TensorFlow prints start-up and converter lines from C++ (file descriptor 2,
before abseil's logging is initialised, where TF_CPP_MIN_LOG_LEVEL does not
reach them), and Python libraries log their own repairs as WARNINGs. Neither
is for the people running the tools; errors still show.
"""
import contextlib
import logging
import os
import re
import sys
import tempfile

# One line of TensorFlow's native logging: "I0000 00:00:1796.. 15737 port.cc:153] ...",
# the notice abseil prints before its logging is initialised, and TFLite's own
# INFO lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.").
NATIVE_LOG_LINE = re.compile(rb"^(?:[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]]+\] |"
                             rb"WARNING: All log messages before absl::InitializeLog\(\)|"
                             rb"INFO: (?:Created|Initialized) TensorFlow Lite)")


@contextlib.contextmanager
def native_logs_hidden(show: bool = False):
    """Runs the body with file descriptor 2 sent to a temporary file, then
    writes back every captured line that is not a native log line (all of them
    when `show`)."""
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
                    if show or not NATIVE_LOG_LINE.match(line)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """The Python logger `name` at `level` for the duration (e.g. "pypdf" at
    ERROR, "tensorflow" at WARNING), its own level restored after."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
