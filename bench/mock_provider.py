"""A mock LLM provider on 127.0.0.1: a hidden token bucket on requests and on tokens, 429 + OpenAI-style
headers, and a log of every call it saw (for ``bench/provider.py`` and ``tests/test_provider*.py``); and
:func:`call_provider`, the throttled task body (Celery or RQ) that calls it and reports each answer.

The hidden limit is ``rpm`` requests and ``tpm`` tokens per minute, enforced (as providers do) by buckets of
``burst_s`` seconds' worth, refilled continuously. Every answer carries ``x-ratelimit-{limit,remaining,reset}-
{requests,tokens}`` (limit per minute, remaining in the bucket, reset = until the bucket is full, as a
duration like ``1.5s``); a 429 adds ``retry-after-ms`` and ``retry-after`` (the time to the next request).

HTTP (the server runs in a thread of the caller's process; ``close()`` stops it):

- ``POST /v1/call`` with headers ``X-Call`` (the caller's id for the call), ``X-Started`` (epoch seconds at
  which the engine admitted the task), ``X-Tokens``: 200 or 429, JSON ``{"ok": bool}``.
- ``POST /held?written=<epoch s>&until=<epoch s>``: a caller says when the engine's hold for a 429 was written
  and until when it holds (the check "no call after the hold was written reaches the provider before its
  Retry-After" needs both).
- ``POST /limit?rpm=<n>``: change the hidden request limit (the bucket is clipped to its new size).
- ``POST /spend?n=<n>``: someone outside the fleet spends ``n`` requests of the key (a 429 follows).
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import taskgate
from taskgate.provider import Reported

__all__ = ["Call", "Hidden", "MockProvider", "admitted_at", "call_provider"]


@dataclass
class Hidden:
    """One hidden bucket: ``per_min`` per minute, ``burst_s`` seconds' worth of capacity."""

    per_min: float
    burst_s: float
    level: float = 0.0
    at: float = -1.0  # never refilled yet: starts full

    @property
    def rate(self) -> float:
        return self.per_min / 60.0

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate * self.burst_s)

    def refill(self, now: float) -> None:
        if self.at < 0:
            self.level = self.capacity
        else:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, n: float) -> float:
        return max(0.0, (n - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.rate


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``1m2.5s``, ``1.5s``, ``20ms``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    m, s = divmod(seconds, 60.0)
    return (f"{int(m)}m" if m else "") + f"{s:.3f}".rstrip("0").rstrip(".") + "s"


@dataclass
class Call:
    at: float  # epoch s when the provider saw it
    status: int
    call: str
    started: float  # epoch s when the engine admitted the task (X-Started)
    retry_after: float = 0.0  # s, on a 429


@dataclass
class MockProvider:
    rpm: float
    tpm: float
    burst_s: float = 2.0
    calls: list[Call] = field(default_factory=list)
    holds: list[tuple[float, float]] = field(default_factory=list)  # (written, until), epoch s
    limits: list[tuple[float, float]] = field(default_factory=list)  # (since, rpm)

    def __post_init__(self) -> None:
        self.req = Hidden(self.rpm, self.burst_s)
        self.tok = Hidden(self.tpm, self.burst_s)
        self.lock = threading.Lock()
        self.limits.append((time.time(), self.rpm))
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the provider ----------------------------------------------------------------------------------

    def set_limit(self, rpm: float) -> None:
        with self.lock:
            now = time.monotonic()
            self.req.refill(now)
            self.req.per_min = rpm
            self.req.level = min(self.req.level, self.req.capacity)
            self.rpm = rpm
            self.limits.append((time.time(), rpm))

    def call(self, call_id: str, started: float, tokens: int) -> tuple[int, dict[str, str]]:
        with self.lock:
            now = time.monotonic()
            self.req.refill(now)
            self.tok.refill(now)
            ok = self.req.level >= 1 and self.tok.level >= tokens
            if ok:
                self.req.level -= 1
                self.tok.level -= tokens
            headers = {
                "x-ratelimit-limit-requests": str(int(self.req.per_min)),
                "x-ratelimit-remaining-requests": str(int(self.req.level)),
                "x-ratelimit-reset-requests": _duration(self.req.reset_s()),
                "x-ratelimit-limit-tokens": str(int(self.tok.per_min)),
                "x-ratelimit-remaining-tokens": str(int(self.tok.level)),
                "x-ratelimit-reset-tokens": _duration(self.tok.reset_s()),
            }
            wait = 0.0
            if not ok:
                wait = max(self.req.wait_for(1), self.tok.wait_for(tokens), 0.001)
                headers["retry-after-ms"] = str(math.ceil(wait * 1000))
                headers["retry-after"] = str(math.ceil(wait))
            status = 200 if ok else 429
            self.calls.append(Call(time.time(), status, call_id, started, wait))
        return status, headers

    def spend(self, n: float) -> None:
        """Someone outside the fleet spends ``n`` requests of the same key (the bucket may go into debt)."""
        with self.lock:
            self.req.refill(time.monotonic())
            self.req.level -= n

    def held(self, written: float, until: float) -> None:
        with self.lock:
            self.holds.append((written, until))

    # -- what it saw ----------------------------------------------------------------------------------

    def early_calls(self) -> tuple[int, int]:
        """(calls admitted after a hold was written that reached the provider before it ended, calls that
        reached it during a hold at all: the others were admitted before the hold was written, in flight)."""
        with self.lock:
            calls, holds = list(self.calls), list(self.holds)
        violations = during = 0
        for c in calls:
            inside = [(w, u) for w, u in holds if w <= c.at < u]
            if inside:
                during += 1
                if any(c.started > w for w, _ in inside):
                    violations += 1
        return violations, during

    # -- the HTTP door ---------------------------------------------------------------------------------

    def serve(self, port: int = 0) -> str:
        """Start serving on 127.0.0.1 (``port`` 0: any free port); returns the base URL."""
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return None

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/v1/call":
                    status, headers = mock.call(
                        self.headers.get("X-Call", "?"),
                        float(self.headers.get("X-Started") or 0),
                        int(self.headers.get("X-Tokens") or 1),
                    )
                    self._send(status, {"ok": status == 200}, headers)
                elif url.path == "/held":
                    mock.held(float(q["written"]), float(q["until"]))
                    self._send(200, {"ok": True})
                elif url.path == "/spend":
                    mock.spend(float(q["n"]))
                    self._send(200, {"ok": True})
                elif url.path == "/limit":
                    mock.set_limit(float(q["rpm"]))
                    self._send(200, {"ok": True})
                else:
                    self._send(404, {"error": url.path})

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-provider", daemon=True)
        self._thread.start()
        host, p = self._server.server_address[:2]
        return f"http://{host!s}:{p}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- the caller: a throttled task body (Celery or RQ) ----------------------------------------------------


def admitted_at() -> float:
    """When the engine admitted the running task (epoch s, the engine's clock): its lease's expiry minus the
    lease TTL. Body start would be later by the admit's reply and the task's startup, so a task admitted
    just before a hold was written could look as if it started after it."""
    held = taskgate.current()
    backend = getattr(held, "backend", None)
    for a in getattr(held, "admissions", ()):
        c = backend.policy(a.policy).concurrency if backend is not None else None
        if a.lease_expires_at and c is not None:
            return float(a.lease_expires_at - c.lease_ttl_ms) / 1000.0
    return time.time()


def call_provider(url: str, call_id: str, tokens: int = 100) -> int:
    """One provider call from a throttled task: report what it said; on a 429 tell the mock when the engine's
    hold was written (for its check) and raise (the gate defers the task)."""
    started = admitted_at()
    req = urllib.request.Request(
        url + "/v1/call",
        data=b"",
        method="POST",
        headers={"X-Call": call_id, "X-Started": repr(started), "X-Tokens": str(tokens)},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            taskgate.current().report(resp.headers)
            return int(resp.status)
    except urllib.error.HTTPError as e:
        if e.code != 429:
            raise
        got = cast("list[Reported]", taskgate.current().report(e))
        hold = max(got, key=lambda r: r.hold_until)
        if hold.hold_until:
            written = (hold.hold_until - hold.retry_after_ms) / 1000.0  # the engine's clock at the write
            q = f"{url}/held?written={written!r}&until={hold.hold_until / 1000.0!r}"
            urllib.request.urlopen(urllib.request.Request(q, data=b"", method="POST"), timeout=10).close()
        raise
