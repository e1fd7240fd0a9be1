"""Stand-in for ``python -m streamqueue.worker`` in the worker-pod runner tests.

It behaves as the runner expects a worker to: serves ``/readyz`` on ``STREAMQUEUE_HEALTH_PORT``
and exits 0 on SIGTERM. Test knobs: ``STANDIN_IGNORE_SIGTERM=1`` (a worker stuck in its drain),
``STANDIN_EXIT_CODE`` (crash at once), SIGUSR1 (toggle ``/readyz`` between 200 and 503), SIGUSR2
(toggle ``/healthz`` between 200 and 500). It leaves
evidence in ``$STANDIN_DIR/<consumer name>/``: the environment it was started with (``env.json``),
one line per start (``starts``) and, on SIGTERM, a ``sigterm`` file, so the tests can tell a
graceful stop from a SIGKILL.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import sys
import threading
from pathlib import Path


class _Health(http.server.BaseHTTPRequestHandler):
    ready = True  # SIGUSR1 flips it, like a worker that loses Redis and gets it back
    live = True  # SIGUSR2 flips it, like a worker whose event loop is wedged

    def do_GET(self) -> None:
        status = {"/readyz": 200 if _Health.ready else 503, "/healthz": 200 if _Health.live else 500}
        self.send_response(status.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    evidence = Path(os.environ["STANDIN_DIR"]) / os.environ["STREAMQUEUE_CONSUMER"]
    evidence.mkdir(parents=True, exist_ok=True)
    (evidence / "env.json").write_text(json.dumps(dict(os.environ)))
    with (evidence / "starts").open("a") as starts:
        starts.write(f"{os.getpid()}\n")
    if "STANDIN_EXIT_CODE" in os.environ:  # a worker that crashes on start
        sys.exit(int(os.environ["STANDIN_EXIT_CODE"]))
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", int(os.environ["STREAMQUEUE_HEALTH_PORT"])), _Health
    )

    def on_sigterm(*_: object) -> None:
        (evidence / "sigterm").write_text(str(os.getpid()))
        if os.environ.get("STANDIN_IGNORE_SIGTERM") != "1":  # a worker stuck in its drain
            threading.Thread(target=server.shutdown).start()

    def on_sigusr1(*_: object) -> None:
        _Health.ready = not _Health.ready

    def on_sigusr2(*_: object) -> None:
        _Health.live = not _Health.live

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGUSR1, on_sigusr1)
    signal.signal(signal.SIGUSR2, on_sigusr2)
    server.serve_forever()


if __name__ == "__main__":
    main()
