"""A loopback HTTP proxy in front of the S3 server that fails a seeded fraction of object GETs with a
transient 503 SlowDown, as a throttled or overloaded store does, and can add a fixed latency to every
answer, as a store across a network does (each request waits on its own: concurrency still helps).

For outages: `storm = True` answers every request, of any kind, 503 SlowDown until it is set back (a hot
prefix, a restarting server); `reset_fraction` drops that share of object GETs without an answer (a
connection reset)."""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied</Message></Error>")


class FlakyProxy:
    def __init__(self, upstream: str, fail_fraction: float = 0.0, seed: int = 0, latency_s: float = 0.0):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.fail_fraction = fail_fraction
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected = 0
        self.object_gets = 0
        self.latency_s = latency_s
        self.in_flight = 0  # object GETs being answered now, and the most at once
        self.max_in_flight = 0
        self.requests: list[tuple[str, str]] = []  # (method, path with query) of every request, in order
        self.storm = False
        self.storm_answers = 0  # requests answered 503 by a storm
        self.reset_fraction = 0.0
        self.resets = 0
        self.denied: set[str] = set()  # object paths (/bucket/key) answered 403 AccessDenied
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                path = urlsplit(self.path).path
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                is_object_get = self.command == "GET" and path.count("/") >= 2 and "?" not in self.path
                if is_object_get:
                    with proxy.lock:
                        proxy.in_flight += 1
                        proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    self._answer(path, is_object_get)
                finally:
                    if is_object_get:
                        with proxy.lock:
                            proxy.in_flight -= 1

            def _slow_down(self):
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOW_DOWN)))
                self.end_headers()
                if self.command != "HEAD":  # a HEAD's answer has no body: one here would corrupt the next
                    self.wfile.write(SLOW_DOWN)

            def _answer(self, path: str, is_object_get: bool):
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.storm:
                    with proxy.lock:
                        proxy.storm_answers += 1
                    self._slow_down()
                    return
                if is_object_get and path in proxy.denied:
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ACCESS_DENIED)))
                    self.end_headers()
                    self.wfile.write(ACCESS_DENIED)
                    return
                if is_object_get:
                    with proxy.lock:
                        proxy.object_gets += 1
                        fail = proxy.rng.random() < proxy.fail_fraction
                        proxy.injected += fail
                        reset = not fail and proxy.rng.random() < proxy.reset_fraction
                        proxy.resets += reset
                    if reset:
                        self.close_connection = True
                        self.connection.shutdown(2)  # no answer at all: the client sees its connection reset
                        return
                    if fail:
                        self._slow_down()
                        return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    # HEAD answers carry the object's length with no body: pass that one through
                    if k.lower() in ("transfer-encoding", "connection") or (
                            k.lower() == "content-length" and self.command != "HEAD"):
                        continue
                    self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
