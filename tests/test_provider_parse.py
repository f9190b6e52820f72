"""taskgate.provider: every header format a provider sends, and malformed values ignored (never raised)."""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
from typing import Any

import pytest

from taskgate.provider import MINUTE_MS, ProviderReport, Quota, is_rate_limit_error, parse

NOW = 1_700_000_000.0


def p(source: object = None, **kw: Any) -> ProviderReport:
    return parse(source, clock=lambda: NOW, **kw)


def iso(delta_s: float) -> str:
    return dt.datetime.fromtimestamp(NOW + delta_s, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")


# -- Retry-After ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ms"),
    [("30", 30_000), ("0", 0), ("1.5", 1500), (" 7 ", 7000), ("0.001", 1)],
)
def test_retry_after_seconds(value: str, ms: int) -> None:
    assert p({"Retry-After": value}).retry_after_ms == ms


def test_retry_after_http_date() -> None:
    value = email.utils.formatdate(NOW + 42, usegmt=True)
    assert p({"retry-after": value}).retry_after_ms == 42_000
    past = email.utils.formatdate(NOW - 10, usegmt=True)
    assert p({"retry-after": past}).retry_after_ms == 0


def test_retry_after_ms_header_wins() -> None:
    assert p({"retry-after-ms": "250", "retry-after": "1"}).retry_after_ms == 250


@pytest.mark.parametrize("value", ["-5", "soon", "", "1e9999", "999999999", "Thu, 99 Foo 2020", "nan"])
def test_retry_after_malformed_is_ignored_with_a_debug_line(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="taskgate"):
        r = p({"Retry-After": value})
    assert r.retry_after_ms is None
    assert len([x for x in caplog.records if "retry-after" in x.getMessage()]) == 1


# -- OpenAI --------------------------------------------------------------------------------------------


def test_openai_headers() -> None:
    r = p(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert r.requests == Quota(60, 59, 1000, MINUTE_MS)
    assert r.tokens == Quota(150_000, 149_984, 360_000, MINUTE_MS)
    assert r.status is None
    assert not r.rate_limited
    assert r.hold_ms == 0


@pytest.mark.parametrize(
    ("value", "ms"),
    [("6m0s", 360_000), ("1.5s", 1500), ("20ms", 20), ("1h2m3s", 3_723_000), ("0s", 0), ("2", 2000),
     ("1m30.5s", 90_500), ("7ms", 7)],
)  # fmt: skip
def test_openai_reset_durations(value: str, ms: int) -> None:
    assert p({"x-ratelimit-reset-requests": value}).requests == Quota(None, None, ms, MINUTE_MS)


@pytest.mark.parametrize("value", ["6x", "-1s", "1s2", "ms", "s1", "99999h", "1.2.3s"])
def test_openai_reset_malformed(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="taskgate"):
        r = p({"x-ratelimit-reset-tokens": value, "x-ratelimit-remaining-tokens": "5"})
    assert r.tokens == Quota(None, 5, None, MINUTE_MS)
    assert len(caplog.records) == 1
    assert "x-ratelimit-reset-tokens" in caplog.records[0].getMessage()


@pytest.mark.parametrize("value", ["-1", "lots", "1e30", "3.5"])
def test_openai_counts_malformed(value: str) -> None:
    r = p({"x-ratelimit-remaining-requests": value, "x-ratelimit-limit-requests": "10"})
    assert r.requests == Quota(10, None, None, MINUTE_MS)


# -- Anthropic -----------------------------------------------------------------------------------------


def test_anthropic_headers_tightest_token_quota() -> None:
    r = p(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": iso(12),
            "anthropic-ratelimit-tokens-limit": "80000",
            "anthropic-ratelimit-tokens-remaining": "70000",
            "anthropic-ratelimit-tokens-reset": iso(30),
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "1000",
            "anthropic-ratelimit-input-tokens-reset": iso(5.5),
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "7000",
            "anthropic-ratelimit-output-tokens-reset": iso(1),
        }
    )
    assert r.requests == Quota(50, 0, 12_000, MINUTE_MS)
    assert r.tokens == Quota(40_000, 1000, 5500, MINUTE_MS)
    assert r.hold_ms == 1200  # requests exhausted: one interval (60 s / 50), not until the full reset


@pytest.mark.parametrize(
    "value", ["tomorrow", "2024-13-45T00:00:00Z", "2024-01-01T00:00:00", "9999-01-01T00:00:00Z"]
)
def test_anthropic_reset_malformed(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="taskgate"):
        r = p({"anthropic-ratelimit-requests-reset": value, "anthropic-ratelimit-requests-remaining": "3"})
    assert r.requests == Quota(None, 3, None, MINUTE_MS)
    assert len(caplog.records) == 1


def test_anthropic_reset_in_the_past_is_zero() -> None:
    r = p({"anthropic-ratelimit-requests-reset": iso(-3)})
    assert r.requests == Quota(None, None, 0, MINUTE_MS)


# -- IETF ----------------------------------------------------------------------------------------------


def test_ietf_structured_fields() -> None:
    r = p({"RateLimit": '"default";r=50;t=30', "RateLimit-Policy": '"default";q=100;w=60'})
    assert r.requests == Quota(100, 50, 30_000, 60_000)


def test_ietf_list_takes_the_tightest() -> None:
    r = p(
        {
            "ratelimit": '"day";r=900;t=3000, "burst";r=2;t=1',
            "ratelimit-policy": '"day";q=1000;w=86400, "burst";q=10;w=1',
        }
    )
    assert r.requests == Quota(10, 2, 1000, 1000)


def test_ietf_older_forms() -> None:
    assert p({"RateLimit": "limit=100, remaining=50, reset=30"}).requests == Quota(100, 50, 30_000, None)
    r = p({"RateLimit-Limit": "100, 100;w=60", "RateLimit-Remaining": "7", "RateLimit-Reset": "3"})
    assert r.requests == Quota(100, 7, 3000, 60_000)


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit": '"default";r=-1;t=x'},
        {"RateLimit": ";;;,,,"},
        {"RateLimit-Remaining": "many", "RateLimit-Reset": "-2"},
        {"RateLimit-Policy": '"default";q=0.5;w=forever'},
    ],
)
def test_ietf_malformed_never_raises(headers: dict[str, str]) -> None:
    r = p(headers)
    q = r.requests
    assert q is None or (q.remaining is None and q.reset_ms is None and q.limit is None)


# -- sources ---------------------------------------------------------------------------------------------


class _Resp:
    def __init__(self, status: int, headers: object) -> None:
        self.status_code = status
        self.headers = headers


class RateLimitError(Exception):  # the shape of openai.RateLimitError / anthropic.RateLimitError
    def __init__(self, headers: dict[str, str], code: str | None = None) -> None:
        super().__init__("Error code: 429")
        self.response = _Resp(429, headers)
        self.status_code = 429
        self.code = code


def test_sdk_exception_by_duck_typing() -> None:
    e = RateLimitError({"retry-after": "2", "x-ratelimit-remaining-requests": "0"})
    assert is_rate_limit_error(e)
    r = p(e)
    assert r.rate_limited
    assert r.retry_after_ms == 2000
    assert r.requests == Quota(None, 0, None, MINUTE_MS)
    assert r.hold_ms == 2000


def test_insufficient_quota_is_not_a_rate_limit() -> None:
    assert not is_rate_limit_error(RateLimitError({}, code="insufficient_quota"))
    assert not is_rate_limit_error(ValueError("nope"))
    assert not is_rate_limit_error("429")


def test_response_object_and_case_insensitive_pairs() -> None:
    r = p(_Resp(429, [(b"Retry-After", b"3"), ("X-RateLimit-Limit-Requests", "10")]))
    assert r.status == 429
    assert r.retry_after_ms == 3000
    assert r.requests == Quota(10, None, None, MINUTE_MS)


def test_plain_status_and_retry_after() -> None:
    r = p(status=429, retry_after=2.5)
    assert r == ProviderReport(status=429, retry_after_ms=2500)
    assert r.hold_ms == 2500
    assert p(status=429, retry_after=dt.timedelta(seconds=4)).retry_after_ms == 4000
    assert p(status=429).hold_ms == 1000  # a bare 429: a short hold
    # explicit arguments win over the headers
    assert p({"retry-after": "9"}, retry_after=1).retry_after_ms == 1000


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"status": 42}, "status must be an HTTP status"),
        ({"status": True}, "status must be an HTTP status"),
        ({"retry_after": -1}, "retry_after must be >= 0"),
        ({"retry_after": "5"}, "retry_after must be seconds"),
        ({"retry_after": float("inf")}, "retry_after must be >= 0"),
    ],
)
def test_bad_arguments_raise_naming_them(kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        p(**kw)


def test_not_headers_at_all() -> None:
    with pytest.raises(ValueError, match="takes response headers"):
        p(42)
