"""What a provider says about its own limits: 429s, ``Retry-After`` and rate-limit headers, parsed.

Pure Python, no I/O, never raises on what a provider sends: :func:`parse` takes a response's headers (any
mapping, case-insensitive, or an object with ``.headers``), an SDK exception (``openai.RateLimitError``,
``anthropic.RateLimitError``, or anything with ``.response.headers`` / ``.status_code``: recognised by duck
typing, so neither SDK is a dependency) and/or a plain ``status=429, retry_after=N`` and gives a
:class:`ProviderReport`. The engine (``engine/lua/op_report.lua``) turns a report into a fleet-wide hold and
pacing; this module decides nothing.

Formats read:

- ``Retry-After``: delta seconds (``"30"``, ``"1.5"``) or an HTTP date; OpenAI's ``retry-after-ms``.
- OpenAI ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; resets are durations (``6m0s``,
  ``1.5s``, ``20ms``, ``1h2m3.5s``). Limits are per minute.
- Anthropic ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}``;
  resets are RFC 3339 instants. Limits are per minute. The token quota reported is the tightest of tokens,
  input tokens and output tokens.
- IETF ``RateLimit`` / ``RateLimit-Policy`` structured fields (``"default";r=50;t=30`` and
  ``"default";q=100;w=60``; the tightest item of a list), the older ``RateLimit: limit=100, remaining=50,
  reset=30`` form, and ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` (``w=`` on the
  limit gives the window). Counted as requests.

A malformed or absurd value (negative, beyond :data:`MAX_DELAY_MS` or :data:`MAX_QUOTA`, an unparseable
date) is ignored with one debug log line; the rest of the report stands.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_DELAY_MS",
    "MAX_QUOTA",
    "ProviderReport",
    "Quota",
    "Reported",
    "as_report",
    "is_rate_limit_error",
    "parse",
]

log = logging.getLogger("taskgate")

MAX_DELAY_MS = 86_400_000  # a Retry-After or reset beyond a day is taken for garbage, not for a limit
MAX_QUOTA = 10**12  # a limit or remaining beyond this is garbage
MINUTE_MS = 60_000  # OpenAI and Anthropic limits are per minute
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_NUMBER = re.compile(r"^\s*\d+(?:\.\d+)?\s*$")


@dataclass(frozen=True, slots=True)
class Quota:
    """One quota as the provider reports it: ``limit`` per ``window_ms``, ``remaining`` now, full again (or
    reset) in ``reset_ms``. Any part may be unknown (None)."""

    limit: int | None = None
    remaining: int | None = None
    reset_ms: int | None = None
    window_ms: int | None = None

    @property
    def empty(self) -> bool:
        return self.limit is None and self.remaining is None and self.reset_ms is None


@dataclass(frozen=True, slots=True)
class ProviderReport:
    """What one provider response said. ``status`` is the HTTP status (None if unknown),
    ``retry_after_ms`` the wait it asked for, ``requests`` / ``tokens`` its reported quotas."""

    status: int | None = None
    retry_after_ms: int | None = None
    requests: Quota | None = None
    tokens: Quota | None = None

    @property
    def rate_limited(self) -> bool:
        """True for a 429 (the call was refused for rate)."""
        return self.status == 429

    @property
    def hold_ms(self) -> int:
        """How long every caller should stop: the Retry-After of a 429, else (a quota reported exhausted)
        until that quota resets; 0 for no hold. A 429 without a Retry-After holds until the exhausted
        quota's reset if one was reported, else 1 s."""
        waits: list[int] = []
        if self.retry_after_ms is not None:
            waits.append(self.retry_after_ms)
        for q in (self.requests, self.tokens):
            if q is not None and q.remaining == 0 and q.reset_ms is not None:
                # a reset is when the quota is *full* again; with a known limit per window the next unit
                # comes one interval after empty (token-bucket providers), so no longer than that
                interval = -(-q.window_ms // q.limit) if q.limit and q.window_ms else q.reset_ms
                waits.append(min(q.reset_ms, interval))
        if waits:
            return max(waits)
        return 1000 if self.rate_limited else 0


@dataclass(frozen=True, slots=True)
class Reported:
    """What the engine made of a report, for the whole fleet. ``hold_until`` (epoch-ms, 0: no hold) and
    ``retry_after_ms`` (from the engine's clock) say when the key reopens; ``capped``: the provider asked
    for a longer hold than the policy's ``provider.maxHold``; ``concurrency_limit`` the (adaptive) limit
    now (0: no concurrency axis); ``provider_limit`` (per its window), ``pacing_interval_ms`` and
    ``pacing_burst`` the pacing the key follows (0: none reported); ``budgets_lowered`` how many token
    budgets were lowered to the reported remaining; ``rate_limited`` the 429s reported on this key so far."""

    report: ProviderReport
    hold_until: int
    retry_after_ms: int
    capped: bool
    concurrency_limit: int
    provider_limit: int
    pacing_interval_ms: float
    budgets_lowered: int
    rate_limited: int
    pacing_burst: int


def _debug(what: str, value: object) -> None:
    text = repr(value)
    log.debug("taskgate: provider %s %s ignored (malformed or out of range)", what, text[:80])


def _headers(source: object) -> dict[str, str]:
    """Lower-cased header names -> values (str) from a mapping, or an object with ``.headers`` / ``.items()``
    (httpx, requests, aiohttp), or a list of pairs. Repeated headers are joined with ``", "``."""
    items: Iterable[Any]
    if isinstance(source, Mapping) or callable(getattr(source, "items", None)):
        items = source.items()  # type: ignore[attr-defined]
    elif isinstance(source, (list, tuple)):
        items = source
    else:
        return {}
    out: dict[str, str] = {}
    try:
        for pair in items:
            k, v = pair
            name = (k.decode("latin-1") if isinstance(k, bytes) else str(k)).strip().lower()
            if isinstance(v, bytes):
                text = v.decode("latin-1")
            elif isinstance(v, (list, tuple)):
                text = ", ".join(x.decode("latin-1") if isinstance(x, bytes) else str(x) for x in v)
            else:
                text = str(v)
            out[name] = f"{out[name]}, {text}" if name in out else text
    except (TypeError, ValueError) as e:
        _debug("headers", e)
    return out


def _status(obj: object) -> int | None:
    for holder in (obj, getattr(obj, "response", None)):
        if holder is None:
            continue
        for attr in ("status_code", "status"):
            v = getattr(holder, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599:
                return v
    return None


def _int(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    text = value.split(",")[0].split(";")[0].strip()
    try:
        n = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            _debug(what, value)
            return None
        if not math.isfinite(f) or f != int(f):
            _debug(what, value)
            return None
        n = int(f)
    if n < 0 or n > MAX_QUOTA:
        _debug(what, value)
        return None
    return n


def _delay_ms(seconds: float, what: str, raw: object) -> int | None:
    if not math.isfinite(seconds) or seconds < 0 or seconds * 1000 > MAX_DELAY_MS:
        _debug(what, raw)
        return None
    return math.ceil(seconds * 1000)


def _seconds(value: str | None, what: str) -> int | None:
    """A delta in (possibly fractional) seconds -> ms."""
    if value is None:
        return None
    if not _NUMBER.match(value):
        _debug(what, value)
        return None
    return _delay_ms(float(value), what, value)


def _go_duration(value: str | None, what: str) -> int | None:
    """OpenAI's reset durations: ``6m0s``, ``1.5s``, ``20ms``, ``1h2m3s`` (a bare number is seconds)."""
    if value is None:
        return None
    text = value.strip()
    if _NUMBER.match(text):
        return _seconds(text, what)
    total, at = 0.0, 0
    for m in _DURATION_PART.finditer(text):
        if m.start() != at:
            break
        n = float(m.group(1))
        total += n * {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}[m.group(2)]
        at = m.end()
    if at == 0 or at != len(text):
        _debug(what, value)
        return None
    return _delay_ms(total / 1000.0, what, value)


def _instant_ms(value: str | None, what: str, now_s: float, *, http_date: bool) -> int | None:
    """An instant (RFC 3339, or an HTTP date) -> ms from ``now_s`` (0 if past)."""
    if value is None:
        return None
    text = value.strip()
    when: dt.datetime | None = None
    try:
        if http_date:
            when = email.utils.parsedate_to_datetime(text)
        else:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (TypeError, ValueError, IndexError, OverflowError):
        when = None
    if when is None or when.tzinfo is None:
        _debug(what, value)
        return None
    delta = when.timestamp() - now_s
    if delta * 1000 > MAX_DELAY_MS:
        _debug(what, value)
        return None
    return max(0, math.ceil(delta * 1000))


def _retry_after(h: Mapping[str, str], now_s: float) -> int | None:
    ms = h.get("retry-after-ms")
    if ms is not None:
        if _NUMBER.match(ms):
            got = _delay_ms(float(ms) / 1000.0, "retry-after-ms", ms)
            if got is not None:
                return got
        else:
            _debug("retry-after-ms", ms)
    ra = h.get("retry-after")
    if ra is None:
        return None
    if _NUMBER.match(ra):
        return _seconds(ra, "retry-after")
    if ra.strip().startswith("-"):
        _debug("retry-after", ra)
        return None
    return _instant_ms(ra, "retry-after", now_s, http_date=True)


def _quota(limit: int | None, remaining: int | None, reset: int | None, window: int | None) -> Quota | None:
    q = Quota(limit, remaining, reset, window)
    return None if q.empty else q


def _tightest(quotas: Iterable[Quota | None]) -> Quota | None:
    """The quota with the least remaining (then the latest reset)."""
    got = [q for q in quotas if q is not None]
    if not got:
        return None
    with_rem = [q for q in got if q.remaining is not None]
    if not with_rem:
        return got[0]
    return min(with_rem, key=lambda q: (q.remaining or 0, -(q.reset_ms or 0)))


def _openai(h: Mapping[str, str]) -> tuple[Quota | None, Quota | None]:
    out: list[Quota | None] = []
    for what in ("requests", "tokens"):
        out.append(
            _quota(
                _int(h.get(f"x-ratelimit-limit-{what}"), f"x-ratelimit-limit-{what}"),
                _int(h.get(f"x-ratelimit-remaining-{what}"), f"x-ratelimit-remaining-{what}"),
                _go_duration(h.get(f"x-ratelimit-reset-{what}"), f"x-ratelimit-reset-{what}"),
                MINUTE_MS,
            )
        )
    return out[0], out[1]


def _anthropic(h: Mapping[str, str], now_s: float) -> tuple[Quota | None, Quota | None]:
    def one(what: str) -> Quota | None:
        name = f"anthropic-ratelimit-{what}"
        return _quota(
            _int(h.get(f"{name}-limit"), f"{name}-limit"),
            _int(h.get(f"{name}-remaining"), f"{name}-remaining"),
            _instant_ms(h.get(f"{name}-reset"), f"{name}-reset", now_s, http_date=False),
            MINUTE_MS,
        )

    return one("requests"), _tightest(one(w) for w in ("tokens", "input-tokens", "output-tokens"))


def _sf_items(value: str) -> list[dict[str, str]]:
    """A structured-field list (``"default";r=50;t=30, "burst";r=5``) or the older dictionary form
    (``limit=100, remaining=50, reset=30``): one dict of parameters per item."""
    items: list[dict[str, str]] = []
    flat: dict[str, str] = {}
    for raw in value.split(","):
        parts = [p.strip() for p in raw.split(";") if p.strip()]
        if not parts:
            continue
        params = {}
        for p in parts:
            if "=" in p:
                k, _, v = p.partition("=")
                params[k.strip().lower()] = v.strip().strip('"')
        head = parts[0]
        if "=" in head and len(parts) == 1:  # the older dictionary form: one key per list member
            flat.update(params)
        else:
            items.append(params)
    if flat:
        items.append(flat)
    return items


def _ietf(h: Mapping[str, str]) -> Quota | None:
    quotas: list[Quota | None] = []
    rl, pol = h.get("ratelimit"), h.get("ratelimit-policy")
    policy_windows: list[tuple[int | None, int | None]] = []
    if pol is not None:
        for it in _sf_items(pol):
            policy_windows.append(
                (_int(it.get("q"), "ratelimit-policy q"), _seconds(it.get("w"), "ratelimit-policy w"))
            )
    if rl is not None:
        for i, it in enumerate(_sf_items(rl)):
            if "limit" in it or "remaining" in it or "reset" in it:  # older dictionary form
                quotas.append(
                    _quota(
                        _int(it.get("limit"), "ratelimit limit"),
                        _int(it.get("remaining"), "ratelimit remaining"),
                        _seconds(it.get("reset"), "ratelimit reset"),
                        None,
                    )
                )
                continue
            q, w = policy_windows[i] if i < len(policy_windows) else (None, None)
            quotas.append(
                _quota(q, _int(it.get("r"), "ratelimit r"), _seconds(it.get("t"), "ratelimit t"), w)
            )
    elif policy_windows:
        quotas += [_quota(q, None, None, w) for q, w in policy_windows]
    if "ratelimit-limit" in h or "ratelimit-remaining" in h or "ratelimit-reset" in h:
        limit_text = h.get("ratelimit-limit")
        window = None
        if limit_text is not None:
            for it in _sf_items(limit_text):
                if "w" in it:
                    window = _seconds(it["w"], "ratelimit-limit w")
        quotas.append(
            _quota(
                _int(limit_text, "ratelimit-limit"),
                _int(h.get("ratelimit-remaining"), "ratelimit-remaining"),
                _seconds(h.get("ratelimit-reset"), "ratelimit-reset"),
                window,
            )
        )
    return _tightest(quotas)


def _merge(a: Quota | None, b: Quota | None) -> Quota | None:
    return _tightest([a, b]) if a is not None and b is not None else (a or b)


def is_rate_limit_error(exc: object) -> bool:
    """True for an exception that says the provider refused for rate: HTTP status 429 (``.status_code``, or
    ``.response.status_code``), e.g. ``openai.RateLimitError`` or ``anthropic.RateLimitError``. OpenAI's
    ``insufficient_quota`` (also a 429) is a billing state, not a rate: waiting does not cure it, so it is
    not one."""
    if not isinstance(exc, BaseException):
        return False
    if getattr(exc, "code", None) == "insufficient_quota":
        return False
    return _status(exc) == 429


def parse(
    source: object = None,
    *,
    status: int | None = None,
    retry_after: float | dt.timedelta | None = None,
    clock: Callable[[], float] = time.time,
) -> ProviderReport:
    """A :class:`ProviderReport` from headers, a response, an exception, and/or a plain ``status`` and
    ``retry_after`` (seconds, or a timedelta). Explicit arguments win over what ``source`` says. Bad
    argument *types* (not header values) raise ValueError, naming them."""
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599
    ):
        raise ValueError(f"status must be an HTTP status code (100-599), got {status!r}")
    ra_ms: int | None = None
    if retry_after is not None:
        if isinstance(retry_after, dt.timedelta):
            secs = retry_after.total_seconds()
        elif isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)):
            raise ValueError(f"retry_after must be seconds (a number) or a timedelta, got {retry_after!r}")
        else:
            secs = float(retry_after)
        if not math.isfinite(secs) or secs < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after!r}")
        ra_ms = math.ceil(secs * 1000)
    now_s = clock()
    headers: dict[str, str] = {}
    got_status: int | None = None
    if source is not None:
        if isinstance(source, BaseException) or hasattr(source, "headers"):
            got_status = _status(source)
            carrier = getattr(source, "headers", None)
            if carrier is None:
                carrier = getattr(getattr(source, "response", None), "headers", None)
            headers = _headers(carrier) if carrier is not None else {}
        else:
            headers = _headers(source)
            if not headers and not isinstance(source, (Mapping, list, tuple)):
                raise ValueError(
                    "report() takes response headers (a mapping), a response or an exception with "
                    f".headers / .response.headers, got {type(source).__name__}"
                )
    req_oa, tok_oa = _openai(headers)
    req_an, tok_an = _anthropic(headers, now_s)
    requests = _merge(_merge(req_oa, req_an), _ietf(headers))
    tokens = _merge(tok_oa, tok_an)
    return ProviderReport(
        status=status if status is not None else got_status,
        retry_after_ms=ra_ms if ra_ms is not None else _retry_after(headers, now_s),
        requests=requests,
        tokens=tokens,
    )


def as_report(
    source: object = None, *, status: int | None = None, retry_after: float | dt.timedelta | None = None
) -> ProviderReport:
    """``source`` if it already is a :class:`ProviderReport` (with no other argument), else :func:`parse`."""
    if isinstance(source, ProviderReport):
        if status is not None or retry_after is not None:
            raise ValueError("report(): give a ProviderReport alone, or headers/an exception with status=...")
        return source
    if source is None and status is None and retry_after is None:
        raise ValueError(
            "report() needs something the provider said: headers, a response or exception, or status=429 "
            "(and retry_after=seconds)"
        )
    return parse(source, status=status, retry_after=retry_after)
