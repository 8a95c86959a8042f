"""A webhook receiver: a real HTTP/1.1 server (stdlib, threads of its own) that records
every POST and answers per path as told: a status, or no answer at all (hanging).

    with WebhookReceiver() as receiver:
        receiver.answer["/flaky"] = 500   # until set back (3xx: with a Location header)
        receiver.hang.add("/slow")        # requests wait until released
        receiver.hang_after["/psa"] = 12  # 12 answered, then the same
        receiver.refuse["/psa"] = {event_id: 422}  # that event, always that status
        receiver.refuse_share["/psa"] = (0.1, 422)  # a tenth of the event ids, always
        receiver.answer_body["/psa"] = b'{"error": "..."}'
        receiver.delay["/late"] = 1.0     # answer, but that much later
        receiver.drop.add("/rude")        # close the connection without an answer
        url = receiver.url("/flaky")
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    """What the receiver answered (0: it hung up without an answer)."""
    at: float
    """time.monotonic() when the request arrived."""

    @property
    def event_id(self) -> str:
        return self.headers.get("x-recon-event-id", "")


class WebhookReceiver:
    def __init__(self) -> None:
        self.answer: dict[str, int] = {}
        self.hang: set[str] = set()
        self.hang_after: dict[str, int] = {}
        """Answer this many requests at a path, then hang like `hang`."""
        self.refuse: dict[str, dict[str, int]] = {}
        """Per path, event ids always answered with a status of their own."""
        self.refuse_share: dict[str, tuple[float, int]] = {}
        """Per path, (share, status): that share of event ids (by hash) always refused."""
        self.answer_body: dict[str, bytes] = {}
        self.delay: dict[str, float] = {}
        self.drop: set[str] = set()
        self.received: list[Received] = []
        self.hanging = 0
        """Requests held without an answer right now."""
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                if receiver._hangs(self.path):
                    with receiver._lock:
                        receiver.hanging += 1
                    receiver._release.wait(120)
                    with receiver._lock:
                        receiver.hanging -= 1
                    receiver._record(Received(self.path, headers, body, 0, arrived))
                    self.close_connection = True
                    return
                if self.path in receiver.drop:
                    receiver._record(Received(self.path, headers, body, 0, arrived))
                    self.close_connection = True
                    return
                pause = receiver.delay.get(self.path)
                if pause:
                    time.sleep(pause)  # a receiver that answers late, on purpose
                status = receiver._status(self.path, headers.get("x-recon-event-id", ""))
                receiver._record(Received(self.path, headers, body, status, arrived))
                answer = receiver.answer_body.get(self.path, b"") if status >= 300 else b""
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _hangs(self, path: str) -> bool:
        if path in self.hang:
            return True
        limit = self.hang_after.get(path)
        return limit is not None and len(self.at(path)) >= limit

    def _status(self, path: str, event_id: str) -> int:
        refused = self.refuse.get(path, {}).get(event_id)
        if refused is not None:
            return refused
        share = self.refuse_share.get(path)
        if share is not None and refused_by_share(event_id, share[0]):
            return share[1]
        return self.answer.get(path, 200)

    def _record(self, received: Received) -> None:
        with self._lock:
            self.received.append(received)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def at(self, path: str, *, delivered: bool = True) -> list[Received]:
        """What reached `path`, in arrival order (only 2xx answers when `delivered`)."""
        with self._lock:
            return [
                r
                for r in self.received
                if r.path == path and (not delivered or 200 <= r.status < 300)
            ]

    def release(self) -> None:
        """Stop hanging: requests waiting now hang up, later ones are answered."""
        self.hang.clear()
        self.hang_after.clear()
        self._release.set()

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


def refused_by_share(event_id: str, share: float) -> bool:
    """Whether `event_id` falls in the refused `share` (the same answer on every attempt)."""
    return int(hashlib.sha256(event_id.encode()).hexdigest()[:8], 16) < share * 2**32


if __name__ == "__main__":
    # A receiver of its own process (for benchmarks): prints its port, answers until
    # stdin closes; paths given as arguments hang, or with "=SHARE" refuse that share of
    # the event ids with 422 ("/reject=0.1").
    import sys

    with WebhookReceiver() as served:
        for argument in sys.argv[1:]:
            path, _, share = argument.partition("=")
            if share:
                served.refuse_share[path] = (float(share), 422)
            else:
                served.hang.add(path)
        print(served.url("").rsplit(":", 1)[1], flush=True)
        sys.stdin.read()
