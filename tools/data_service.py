"""data_service: run a tf.data service dispatcher or worker until killed.

    data_service --role=dispatcher --port=5050
    data_service --role=worker --dispatcher=grpc://HOST:5050 --port=5051 --worker_host=$(hostname)
    train --flagfile=b1.flags --data_service=grpc://HOST:5050

One dispatcher per cluster; as many workers as the input pipeline needs CPU
(each runs the whole decode/resize/augment graph the trainer sends). Workers may
be added or removed while training runs. Stop with Ctrl-C or SIGTERM.
"""
import signal
import sys
import time

from absl import app
from absl import flags

from upright import tools

_ROLE = flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "Which server to run.")
_PORT = flags.DEFINE_integer("port", None, "TCP port to serve on (0: a free port, printed).",
                             lower_bound=0, upper_bound=65535)
_DISPATCHER = flags.DEFINE_string("dispatcher", None,
                                  "Worker only: the dispatcher, grpc://HOST:PORT.")
_WORKER_HOST = flags.DEFINE_string(
    "worker_host", "localhost", "Worker only: the host name under which trainers reach "
    "this worker (set it to this machine's name or IP when they run elsewhere).")
_WORK_DIR = flags.DEFINE_string(
    "work_dir", None, "Dispatcher only: folder for its journal; a restarted dispatcher "
    "then continues its jobs (fault-tolerant mode).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if _ROLE.value is None or _PORT.value is None:
        raise app.UsageError("--role (dispatcher or worker) and --port are required")
    from upright.pipeline import data_service
    if _ROLE.value == "worker":
        if not _DISPATCHER.value:
            raise app.UsageError("--role=worker needs --dispatcher=grpc://HOST:PORT")
        try:
            data_service.check_address(_DISPATCHER.value)
        except ValueError as e:
            raise app.UsageError(str(e))
        server = data_service.start_worker(_DISPATCHER.value, _PORT.value,
                                           worker_host=_WORKER_HOST.value)
        print(f"data_service: worker on port {server._server.bound_port()} "
              f"serving dispatcher {_DISPATCHER.value}", flush=True)
    else:
        if _DISPATCHER.value:
            raise app.UsageError("--dispatcher is for --role=worker")
        server = data_service.start_dispatcher(_PORT.value, work_dir=_WORK_DIR.value)
        print(f"data_service: dispatcher at {server.target}", flush=True)
    # The server runs in background threads. Wait in Python (server.join() would
    # block in C++, where Ctrl-C and SIGTERM are not seen); SIGTERM (kill,
    # container stop) ends the process like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    return 0


def run():
    tools.run_tool(main, __name__)


if __name__ == "__main__":
    run()
