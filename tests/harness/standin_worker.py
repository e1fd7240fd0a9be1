"""Stand-in for ``python -m streamqueue.worker`` in the worker-pod runner tests.

It behaves as the runner expects a worker to: serves ``/readyz`` on ``STREAMQUEUE_HEALTH_PORT``
and exits 0 on SIGTERM (unless ``STANDIN_IGNORE_SIGTERM=1``; ``STANDIN_EXIT_CODE`` makes it crash
at once). It leaves evidence in ``$STANDIN_DIR/<consumer name>/``: the environment it was started
with (``env.json``), one line per start (``starts``) and, on SIGTERM, a ``sigterm`` file, so the
tests can tell a graceful stop from a SIGKILL.
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
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/readyz" else 404)
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

    signal.signal(signal.SIGTERM, on_sigterm)
    server.serve_forever()


if __name__ == "__main__":
    main()
