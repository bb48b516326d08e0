"""The JSON-over-HTTP request handler both servers build on (`llm-trainer vllm-serve`, `llm-trainer train-serve`)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JSONRequestHandler(BaseHTTPRequestHandler):
    """Replies with JSON bodies and logs requests at debug level to `logger` (set by the subclass)."""

    logger = logging.getLogger("llm_trainer.http")

    def _reply(self, payload: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        self.logger.debug("%s - %s", self.address_string(), format % args)


def serve_until_interrupted(server: ThreadingHTTPServer) -> None:
    """Serve until Ctrl-C (or `server.shutdown()` from another thread), then close the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
