"""The policy loader: ThrottleKit's file format loads unchanged, our additive keys load, and every kind of bad
input is rejected at load with an :class:`~taskgate.InvalidPolicyError` naming the policy, the field and the
value."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

import taskgate
from taskgate.engine.plan import rate_params
from taskgate.policy import BudgetSpec, ConcurrencySpec, DeferralSpec, RateSpec, parse_duration

THROTTLEKIT_FILE = textwrap.dedent(
    """\
    version: 1
    limiters:
      api:
        strategy: gcra
        limit: 10
        period: 1s
        burst: 5
      uploads:
        strategy: tokenBucket
        capacity: 20
        refillPerSec: 2.5
      daily:
        strategy: fixedWindow
        limit: 1000
        windowMs: 86400000
      search:
        strategy: slidingWindow
        limit: 100
        windowMs: 60000
        buckets: 6
      login:
        strategy: slidingWindowLog
        limit: 5
        windowMs: 900000
      llm:
        tokenBudget: {budget: 100000, windowMs: 60000}
      cc:
        concurrency: {minLimit: 3, maxLimit: 3}
      unified:
        strategy: gcra
        limit: 5
        period: 1h
        burst: 5
        concurrency: {minLimit: 2, maxLimit: 2}
      leased:
        strategy: gcra
        limit: 5
        period: 1h
        burst: 5
        twoTier: {mode: leased, batch: 5}
    """
)

GCRA: dict[str, Any] = {"strategy": "gcra", "limit": 10, "period": "1s"}


def load_one(spec: object, name: str = "p") -> taskgate.Policy:
    return taskgate.load_policies({name: spec})[name]


def invalid(source: Any) -> str:
    """Load ``source`` expecting an InvalidPolicyError (also a ValueError); return its message."""
    with pytest.raises(taskgate.InvalidPolicyError) as info:
        taskgate.load_policies(source)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, taskgate.TaskgateError)
    return str(info.value)


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --- what loads --------------------------------------------------------------------------------


def test_throttlekit_file_with_every_strategy_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "throttlekit.yaml"
    path.write_text(THROTTLEKIT_FILE, encoding="utf-8")
    ps = taskgate.load_policies(path)
    assert isinstance(ps, taskgate.Policies)
    assert sorted(ps) == sorted(
        ["api", "uploads", "daily", "search", "login", "llm", "cc", "unified", "leased"]
    )
    assert ps["api"].rate == RateSpec("gcra", limit=10, period_ms=1000, burst=5)
    assert ps["uploads"].rate == RateSpec("tokenBucket", capacity=20, refill_per_sec=2.5)
    assert ps["daily"].rate == RateSpec("fixedWindow", limit=1000, window_ms=86_400_000)
    assert ps["search"].rate == RateSpec("slidingWindow", limit=100, window_ms=60_000, buckets=6)
    assert ps["login"].rate == RateSpec("slidingWindowLog", limit=5, window_ms=900_000)
    assert ps["llm"].budgets == (BudgetSpec(budget=100_000, window_ms=60_000),)
    assert ps["llm"].rate is None
    assert ps["llm"].kind == "tokenBudget"
    assert ps["cc"].concurrency == ConcurrencySpec(min_limit=3, max_limit=3)
    assert ps["cc"].kind == "concurrency"
    assert not ps["cc"].concurrency.adaptive
    assert ps["unified"].kind == "unified"
    assert ps["unified"].rate == RateSpec("gcra", limit=5, period_ms=3_600_000, burst=5)
    assert ps["leased"].rate == ps["unified"].rate
    assert ps["api"].kind == "rateLimit"
    assert all(isinstance(p, taskgate.Policy) for p in ps.values())


def test_the_same_file_loads_from_a_str_path_yaml_text_and_a_mapping(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "policies.yaml"
    path.write_text(THROTTLEKIT_FILE, encoding="utf-8")
    from_path = taskgate.load_policies(path)
    from_str_path = taskgate.load_policies(str(path))
    from_text = taskgate.load_policies(THROTTLEKIT_FILE)
    from_mapping = taskgate.load_policies(yaml.safe_load(THROTTLEKIT_FILE))
    bare = taskgate.load_policies(yaml.safe_load(THROTTLEKIT_FILE)["limiters"])  # just {name: policy}
    for other in (from_str_path, from_text, from_mapping, bare):
        assert dict(other) == dict(from_path)
    assert taskgate.load_policies(from_path) is from_path
    assert len(taskgate.load_policies(None)) == 0


def test_a_str_path_with_a_colon_is_still_a_path(tmp_path: Path) -> None:
    """TASKGATE_POLICIES is a str: a file under ``env:prod/`` (or ``C:\\...``) is read, not parsed as YAML."""
    folder = tmp_path / "env:prod"
    folder.mkdir()
    path = folder / "policies.yaml"
    path.write_text(THROTTLEKIT_FILE, encoding="utf-8")
    assert "api" in taskgate.load_policies(str(path))
    msg = invalid(str(folder / "missing.yaml"))
    assert_names(msg, repr(str(folder / "missing.yaml")), "not found")
    assert list(taskgate.load_policies("api: {strategy: gcra, limit: 1, period: 1s}")) == ["api"]


def test_version_may_be_omitted() -> None:
    ps = taskgate.load_policies({"limiters": {"api": GCRA}})
    assert list(ps) == ["api"]


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("1m", 60_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        (250, 250),
        ("1500", 1500),
        (" 2 s ", 2000),
    ],
)
def test_durations(text: object, ms: int) -> None:
    assert parse_duration(text) == ms
    assert load_one({**GCRA, "period": text}).rate == RateSpec("gcra", limit=10, period_ms=ms)


def test_max_deferrals_zero_means_never_defer() -> None:
    """As a task's own max_deferrals=0: the first denial applies onExhausted (fail or run), no deferral."""
    assert load_one({**GCRA, "deferral": {"maxDeferrals": 0}}).deferral.max_deferrals == 0
    with pytest.raises(taskgate.InvalidPolicyError, match=r"deferral\.maxDeferrals.*-1.*>= 0"):
        load_one({**GCRA, "deferral": {"maxDeferrals": -1}})


def test_window_synonyms() -> None:
    for field in ("windowMs", "window", "period", "periodMs"):
        p = load_one({"strategy": "fixedWindow", "limit": 3, field: "2s"})
        assert p.rate == RateSpec("fixedWindow", limit=3, window_ms=2000)
    assert load_one({"strategy": "gcra", "limit": 3, "periodMs": 900}).rate == RateSpec(
        "gcra", limit=3, period_ms=900
    )


def test_token_budget_as_a_mapping_and_as_a_list() -> None:
    one = load_one({"tokenBudget": {"budget": 500, "window": "1m"}})
    assert one.budgets == (BudgetSpec(500, 60_000),)
    two = load_one(
        {"tokenBudget": [{"budget": 100_000, "windowMs": "1m"}, {"budget": 2_000_000, "window": "1d"}]}
    )
    assert two.budgets == (BudgetSpec(100_000, 60_000), BudgetSpec(2_000_000, 86_400_000))
    assert two.admits
    assert two.kind == "tokenBudget"


def test_concurrency_with_every_field() -> None:
    p = load_one({"concurrency": {"minLimit": 2, "maxLimit": 8, "perKey": True, "leaseTtl": "45s"}})
    assert p.concurrency == ConcurrencySpec(min_limit=2, max_limit=8, per_key=True, lease_ttl_ms=45_000)
    assert p.concurrency.adaptive
    assert p.admits
    pinned = load_one({"concurrency": {"maxLimit": 4}})
    assert pinned.concurrency == ConcurrencySpec(min_limit=4, max_limit=4, per_key=False, lease_ttl_ms=30_000)
    only_min = load_one({"concurrency": {"minLimit": 3}})
    assert only_min.concurrency == ConcurrencySpec(min_limit=3, max_limit=3)


def test_additive_keys() -> None:
    p = load_one(
        {
            **GCRA,
            "burst": 4,
            "fail": "open",
            "accounting": "debit",
            "bookingHorizon": "10s",
            "bookingGrace": "5s",
            "deferral": {"maxDeferrals": 7, "onExhausted": "run", "jitter": "200ms"},
            "counters": False,
            "description": "the public API",
            "tokenBudget": {"budget": 10, "windowMs": 1000},
            "concurrency": {"maxLimit": 2},
        }
    )
    assert p.fail == "open"
    assert p.accounting == "debit"
    assert p.booking_horizon_ms == 10_000
    assert p.booking_grace_ms == 5_000
    assert p.deferral == DeferralSpec(max_deferrals=7, on_exhausted="run", jitter_ms=200)
    assert p.counters is False
    assert p.kind == "unified"
    defaults = load_one(GCRA)
    assert (defaults.fail, defaults.accounting, defaults.counters) == ("closed", "escrow", True)
    assert defaults.deferral == DeferralSpec()
    assert defaults.booking_horizon_ms == 60_000  # booking is on by default for gcra...
    assert load_one({**GCRA, "bookingHorizon": 0}).booking_horizon_ms == 0  # ...and can be switched off
    window = load_one({"strategy": "fixedWindow", "limit": 1, "window": "1s"})
    assert window.booking_horizon_ms == 0  # ...and off for the other strategies


def test_two_tier_is_accepted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="taskgate"):
        p = load_one(
            {**GCRA, "twoTier": {"mode": "leased", "batch": 5, "windowCoupled": True}}, name="leased"
        )
    assert p.rate == RateSpec("gcra", limit=10, period_ms=1000)
    assert any("leased" in r.getMessage() and "twoTier" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("key", ["federated", "fleetBudget", "distributedConcurrency", "federatedFairEscrow"])
def test_unimplemented_throttlekit_keys_are_rejected_naming_the_key(key: str) -> None:
    msg = invalid({"regional": {**GCRA, key: {"regions": ["eu", "us"]}}})
    assert_names(msg, "'regional'", repr(key), "remove the key")


# --- what is rejected: one test per kind of bad input --------------------------------------------------


@pytest.mark.parametrize(
    ("field", "spec"),
    [("limit", GCRA), ("capacity", {"strategy": "tokenBucket", "capacity": 1, "refillPerSec": 1})],
)
def test_zero_limit(field: str, spec: dict[str, Any]) -> None:
    msg = invalid({"zero": {**spec, field: 0}})
    assert_names(msg, "'zero'", repr(field), "= 0", ">= 1")


def test_negative_limit() -> None:
    msg = invalid({"neg": {"strategy": "fixedWindow", "limit": -5, "window": "1s"}})
    assert_names(msg, "'neg'", "'limit'", "-5")


def test_burst_below_one() -> None:
    msg = invalid({"bursty": {**GCRA, "burst": 0}})
    assert_names(msg, "'bursty'", "'burst'", "= 0")


def test_unknown_strategy() -> None:
    msg = invalid({"leaky": {"strategy": "leakyBucket", "limit": 3, "period": "1s"}})
    assert_names(msg, "'leaky'", "'strategy'", "'leakyBucket'", "gcra")


@pytest.mark.parametrize(
    ("typo", "meant", "where"),
    [("limt", "limit", ""), ("refilPerSec", "refillPerSec", ""), ("maxLimt", "maxLimit", "concurrency.")],
)
def test_misspelt_key_suggests_the_right_one(typo: str, meant: str, where: str) -> None:
    if where:
        spec: dict[str, Any] = {**GCRA, "concurrency": {typo: 3}}
    elif meant == "refillPerSec":
        spec = {"strategy": "tokenBucket", "capacity": 3, typo: 3}
    else:
        spec = {"strategy": "gcra", typo: 3, "period": "1s"}
    msg = invalid({"typo": spec})
    assert_names(msg, "'typo'", f"'{where}{typo}'", "= 3", f"did you mean {meant!r}")


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("limit", "ten", "'ten'"),
        ("limit", True, "True"),
        ("limit", 2.5, "2.5"),
        ("period", [1], "[1]"),
        ("period", 1.5, "1.5"),
        ("burst", "3", "'3'"),
        ("fail", True, "True"),
        ("counters", "yes", "'yes'"),
        ("description", 3, "3"),
    ],
)
def test_wrong_type(field: str, value: object, shown: str) -> None:
    msg = invalid({"typed": {**GCRA, field: value}})
    assert_names(msg, "'typed'", repr(field), shown)


@pytest.mark.parametrize(
    ("value", "shown"),
    [("5 parsecs", "'5 parsecs'"), ("0s", "'0s'"), (-1, "-1"), (0, "= 0"), ("1.5s", "'1.5s'"), ("s", "'s'")],
)
def test_bad_duration(value: object, shown: str) -> None:
    msg = invalid({"dur": {**GCRA, "period": value}})
    assert_names(msg, "'dur'", "'period'", shown, "duration")


@pytest.mark.parametrize(
    ("strategy", "field", "value"),
    [
        ("gcra", "capacity", 5),
        ("tokenBucket", "limit", 5),
        ("fixedWindow", "burst", 2),
        ("slidingWindowLog", "buckets", 4),
    ],
)
def test_field_not_for_the_strategy(strategy: str, field: str, value: int) -> None:
    base: dict[str, Any] = (
        {"capacity": 3, "refillPerSec": 1} if strategy == "tokenBucket" else {"limit": 3, "period": "1s"}
    )
    msg = invalid({"mixed": {"strategy": strategy, **base, field: value}})
    assert_names(msg, "'mixed'", repr(field), f"= {value}", repr(strategy))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"strategy": "gcra", "period": "1s"}, "'limit'"),
        ({"strategy": "gcra", "limit": 3}, "'period'"),
        ({"strategy": "tokenBucket", "capacity": 3}, "'refillPerSec'"),
        ({"strategy": "slidingWindow", "limit": 3}, "'windowMs'"),
        ({"tokenBudget": {"budget": 3}}, "'tokenBudget.windowMs'"),
        ({"concurrency": {"perKey": True}}, "'concurrency'"),
        ({"description": "no axis at all"}, "'strategy'"),
        ({"limit": 3, "period": "1s"}, "'strategy'"),
    ],
)
def test_missing_required_field(spec: dict[str, Any], field: str) -> None:
    msg = invalid({"partial": spec})
    assert_names(msg, "'partial'", field)


def test_min_limit_above_max_limit() -> None:
    msg = invalid({"cc": {"concurrency": {"minLimit": 5, "maxLimit": 2}}})
    assert_names(msg, "'cc'", "'concurrency.minLimit'", "= 5", "maxLimit", "2")


@pytest.mark.parametrize(("field", "value"), [("fail", "sometimes"), ("accounting", "later")])
def test_bad_choice(field: str, value: str) -> None:
    msg = invalid({"modes": {**GCRA, field: value}})
    assert_names(msg, "'modes'", repr(field), repr(value))


def test_unknown_top_level_key() -> None:
    msg = invalid("version: 1\nlimiters:\n  api: {strategy: gcra, limit: 1, period: 1s}\nlimters: {}\n")
    assert_names(msg, "<yaml>", "top-level", "'limters'")


@pytest.mark.parametrize("version", [2, "1", True, 0])
def test_unknown_version(version: object) -> None:
    msg = invalid({"version": version, "limiters": {"api": GCRA}})
    assert_names(msg, "'version'", f"= {version!r}", "version 1")


@pytest.mark.parametrize("name", ["", "has space", "slash/es", "x" * 129, "brace{", "colon:x", 7, None])
def test_bad_policy_name(name: Any) -> None:
    msg = invalid({name: GCRA})
    assert_names(msg, f"policy name {name!r}", "letters, digits")


def test_invalid_yaml(tmp_path: Path) -> None:
    msg = invalid("version: 1\nlimiters:\n  api: {strategy: gcra, limit: [1\n")
    assert_names(msg, "<yaml>", "not valid YAML", "line")
    path = tmp_path / "broken.yaml"
    path.write_text("limiters:\n\tapi: 1\n", encoding="utf-8")
    assert_names(invalid(path), str(path), "not valid YAML")


def test_duplicated_yaml_key_is_rejected_not_silently_last_wins() -> None:
    text = (
        "version: 1\nlimiters:\n  api:\n    strategy: gcra\n    limit: 10\n    limit: 100\n    period: 1s\n"
    )
    assert_names(invalid(text), "duplicate key 'limit'", "line 6")
    twice = (
        "limiters:\n"
        "  api: {strategy: gcra, limit: 1, period: 1s}\n"
        "  api: {strategy: gcra, limit: 9, period: 1s}\n"
    )
    assert_names(invalid(twice), "duplicate key 'api'")
    merged = "base: &b {strategy: gcra, limit: 1, period: 1s}\nfast: {<<: *b, limit: 3}\n"
    assert taskgate.load_policies(merged)["fast"].rate == RateSpec("gcra", limit=3, period_ms=1000)


@pytest.mark.parametrize("kind", ["path", "str", "empty"])
def test_file_not_found(tmp_path: Path, kind: str) -> None:
    missing = tmp_path / "nope.yaml"
    source: Any = {"path": missing, "str": str(missing), "empty": ""}[kind]
    msg = invalid(source)
    assert_names(msg, "not found", repr(str(source)))


@pytest.mark.parametrize("source", ["[1, 2]", "just text", 42])
def test_not_a_mapping_of_policies(source: Any) -> None:
    if source == "just text":  # one line without ':' is taken for a path
        assert_names(invalid(source), "'just text'", "not found")
        return
    with pytest.raises(taskgate.InvalidPolicyError, match="mapping"):
        taskgate.load_policies(f"{source}\n" if isinstance(source, str) else source)


def test_limiters_not_a_mapping() -> None:
    assert_names(invalid("version: 1\nlimiters: [api]\n"), "'limiters'", "mapping")
    assert_names(invalid({"api": "gcra 10/s"}), "'api'", "'gcra 10/s'", "mapping")


@pytest.mark.parametrize(("window", "buckets"), [("1s", 7), (1000, 3), ("1m", 7)])
def test_buckets_not_dividing_the_window(window: object, buckets: int) -> None:
    msg = invalid({"sw": {"strategy": "slidingWindow", "limit": 10, "window": window, "buckets": buckets}})
    assert_names(msg, "'sw'", "'buckets'", f"= {buckets}", "divisor")


@pytest.mark.parametrize(
    ("first", "second"), [("window", "windowMs"), ("period", "windowMs"), ("period", "periodMs")]
)
def test_duplicated_synonym_fields(first: str, second: str) -> None:
    spec = {"strategy": "fixedWindow", "limit": 3, first: "1s", second: 1000}
    msg = invalid({"syn": spec})
    assert_names(msg, "'syn'", repr(first), repr(second), "'1s'", "1000", "synonyms")


def test_budget_and_concurrency_value_errors() -> None:
    assert_names(invalid({"b": {"tokenBudget": []}}), "'b'", "'tokenBudget'", "[]", "non-empty list")
    assert_names(
        invalid({"b": {"tokenBudget": [{"budget": 1, "windowMs": 1000}, {"budget": 2, "window": "1s"}]}}),
        "'b'",
        "'tokenBudget'",
        "distinct windows",
    )
    assert_names(invalid({"b": {"tokenBudget": ["lots"]}}), "'b'", "'tokenBudget[0]'", "'lots'")
    assert_names(
        invalid({"c": {"concurrency": {"maxLimit": 2, "leaseTtl": "500ms"}}}),
        "'c'",
        "'concurrency.leaseTtl'",
        "'500ms'",
    )
    assert_names(
        invalid({"c": {"concurrency": {"maxLimit": 2, "perKey": "yes"}}}),
        "'c'",
        "'concurrency.perKey'",
        "'yes'",
    )
    assert_names(invalid({"c": {"concurrency": 4}}), "'c'", "'concurrency'", "= 4", "mapping")
    assert_names(
        invalid({"d": {**GCRA, "deferral": {"onExhausted": "retry"}}}),
        "'d'",
        "'deferral.onExhausted'",
        "'retry'",
    )


def test_impossible_rate_values() -> None:
    tb = {"strategy": "tokenBucket", "capacity": 3}
    for value in (0, -1, float("nan"), float("inf"), "2/s"):
        assert_names(invalid({"tb": {**tb, "refillPerSec": value}}), "'tb'", "'refillPerSec'", repr(value))
    assert_names(
        invalid({"log": {"strategy": "slidingWindowLog", "limit": 10**6, "window": "1s"}}),
        "'log'",
        "'limit'",
        "1000000",
    )
    assert_names(
        invalid({"sw": {"strategy": "slidingWindow", "limit": 1, "window": "1s", "buckets": 0}}),
        "'sw'",
        "'buckets'",
        "= 0",
    )
    assert_names(
        invalid({"fw": {"strategy": "fixedWindow", "limit": 1, "window": "1s", "bookingHorizon": "1s"}}),
        "'fw'",
        "'bookingHorizon'",
        "'1s'",
        "gcra",
    )


def test_error_carries_policy_and_field_attributes() -> None:
    with pytest.raises(taskgate.InvalidPolicyError) as info:
        taskgate.load_policies({"api": {**GCRA, "limit": 0}})
    assert (info.value.policy, info.value.field) == ("api", "limit")


def test_unknown_policy_lookup_names_it_and_the_loaded_ones() -> None:
    ps = taskgate.load_policies(THROTTLEKIT_FILE)
    with pytest.raises(taskgate.PolicyNotFoundError) as info:
        ps["nope"]
    assert isinstance(info.value, KeyError)
    assert_names(str(info.value), "'nope'", "api", "uploads", "leased")


# -- arithmetic ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "tolerant"), [(None, False), ("throttlekit", False), ("tolerant", True)])
def test_arithmetic_defaults_to_throttlekit(value: str | None, tolerant: bool) -> None:
    spec: dict[str, Any] = {"strategy": "gcra", "limit": 6, "period": "12755ms"}
    if value is not None:
        spec["arithmetic"] = value
    p = taskgate.load_policies({"p": spec})["p"]
    assert p.rate is not None
    assert p.rate.tolerant is tolerant
    assert rate_params(p.rate) == [
        12755,
        6,
        1,
        1 if tolerant else 0,
    ]  # the flag rides after the strategy's ARGV
    assert p.rate.describe().endswith("tolerant arithmetic") is tolerant


def test_arithmetic_is_checked() -> None:
    with pytest.raises(taskgate.InvalidPolicyError, match="arithmetic") as e:
        taskgate.load_policies({"p": {"strategy": "gcra", "limit": 1, "period": "1s", "arithmetic": "exact"}})
    assert e.value.field == "arithmetic"
    with pytest.raises(taskgate.InvalidPolicyError, match="rate axis") as e:
        taskgate.load_policies({"p": {"concurrency": {"maxLimit": 2}, "arithmetic": "tolerant"}})
    assert e.value.field == "arithmetic"
