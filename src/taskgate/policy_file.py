"""The loader of the policy file (ThrottleKit's format plus additive keys): YAML or a mapping in, validated
:class:`~taskgate.policy_model.Policies` out. Every mistake is rejected at load with the policy name, the
field and the value (:class:`~taskgate.errors.InvalidPolicyError`); :mod:`taskgate.policy` shows the format.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from taskgate.errors import InvalidPolicyError
from taskgate.policy_model import (
    STRATEGIES,
    BudgetSpec,
    ConcurrencySpec,
    DeferralSpec,
    FairnessSpec,
    Policies,
    Policy,
    PolicySource,
    ProviderSpec,
    RateSpec,
)

__all__ = ["load_policies", "parse_duration", "parse_policy"]

log = logging.getLogger("taskgate")

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_LOG_LIMIT = 100_000  # slidingWindowLog keeps one member per unit

# ThrottleKit keys we read but do not need: decisions here are already exact fleet-wide.
_ACCEPTED_TK_KEYS = {
    "twoTier": "taskgate's decisions are exact fleet-wide (one atomic script per decision); "
    "twoTier is accepted and treated as exact",
}
_UNSUPPORTED_TK_KEYS = {
    "federated": "multi-region federation",
    "fleetBudget": "fleet budget leasing",
    "distributedConcurrency": "distributed concurrency",
    "federatedFairEscrow": "federated fair escrow",
}


def parse_duration(value: object, *, policy: str = "?", field: str = "duration") -> int:
    """A duration in ms: an int (ms) or a string like ``500ms``, ``30s``, ``1m``, ``1h``, ``1d``."""
    if isinstance(value, bool):
        raise _bad(policy, field, value, "a duration such as 500ms, 30s, 1m, 1h, 1d or an integer of ms")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            if value.strip().isdigit():
                ms = int(value.strip())
            else:
                raise _bad(
                    policy, field, value, "a duration such as 500ms, 30s, 1m, 1h, 1d or ms as an integer"
                )
        else:
            ms = int(m.group(1)) * _UNIT_MS[m.group(2)]
    else:
        raise _bad(policy, field, value, "a duration such as 500ms, 30s, 1m, 1h, 1d or ms as an integer")
    if ms <= 0:
        raise _bad(policy, field, value, "a duration > 0")
    return ms


def _bad(policy: str, field: str, value: object, expected: str) -> InvalidPolicyError:
    return InvalidPolicyError(
        f"policy {policy!r}: field {field!r} = {value!r}: expected {expected}", policy=policy, field=field
    )


def _short(value: object, width: int = 80) -> str:
    """``repr(value)``, cut to ``width`` characters (an error names the value, it does not dump it)."""
    r = repr(value)
    return r if len(r) <= width else r[: width - 3] + "..."


_POLICY_KEYS = {
    "strategy", "limit", "period", "periodMs", "burst", "capacity", "refillPerSec", "windowMs", "window",
    "buckets", "tokenBudget", "concurrency", "fail", "accounting", "bookingHorizon", "bookingGrace",
    "deferral", "counters", "description", "arithmetic", "provider", "fairness",
}  # fmt: skip
_STRATEGY_FIELDS: dict[str, set[str]] = {
    "gcra": {"limit", "period", "periodMs", "burst"},
    "tokenBucket": {"capacity", "refillPerSec"},
    "fixedWindow": {"limit", "windowMs", "window", "period", "periodMs"},
    "slidingWindow": {"limit", "windowMs", "window", "period", "periodMs", "buckets"},
    "slidingWindowLog": {"limit", "windowMs", "window", "period", "periodMs"},
}
_RATE_FIELDS = set().union(*_STRATEGY_FIELDS.values())


class _Reader:
    """Reads one mapping of one policy, naming the policy and field in every error."""

    def __init__(self, policy: str, data: Mapping[str, Any], where: str = "") -> None:
        self.policy = policy
        self.data = data
        self.where = where

    def path(self, name: str) -> str:
        return f"{self.where}{name}"

    def has(self, name: str) -> bool:
        return name in self.data

    def integer(
        self, name: str, *, default: int | None = None, minimum: int = 1, maximum: int | None = None
    ) -> int:
        if name not in self.data:
            if default is None:
                raise InvalidPolicyError(
                    f"policy {self.policy!r}: missing required field {self.path(name)!r}",
                    policy=self.policy,
                    field=self.path(name),
                )
            return default
        v = self.data[name]
        if isinstance(v, bool) or not isinstance(v, int):
            raise _bad(self.policy, self.path(name), v, "an integer")
        if v < minimum:
            raise _bad(self.policy, self.path(name), v, f"an integer >= {minimum}")
        if maximum is not None and v > maximum:
            raise _bad(self.policy, self.path(name), v, f"an integer <= {maximum}")
        return v

    def number(self, name: str) -> float:
        if name not in self.data:
            raise InvalidPolicyError(
                f"policy {self.policy!r}: missing required field {self.path(name)!r}",
                policy=self.policy,
                field=self.path(name),
            )
        v = self.data[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
            raise _bad(self.policy, self.path(name), v, "a number > 0")
        return float(v)

    def duration(self, *names: str, default: int | None = None) -> int:
        present = [n for n in names if n in self.data]
        if len(present) > 1:
            given = ", ".join(f"{self.path(n)!r} = {_short(self.data[n])}" for n in present)
            raise InvalidPolicyError(
                f"policy {self.policy!r}: fields {given} are synonyms; give one",
                policy=self.policy,
                field=self.path(present[1]),
            )
        if not present:
            if default is not None:
                return default
            raise InvalidPolicyError(
                f"policy {self.policy!r}: missing required field {self.path(names[0])!r} (a duration)",
                policy=self.policy,
                field=self.path(names[0]),
            )
        return parse_duration(self.data[present[0]], policy=self.policy, field=self.path(present[0]))

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        v = self.data.get(name, default)
        if v not in choices:
            raise _bad(self.policy, self.path(name), v, " or ".join(map(repr, choices)))
        return cast(str, v)

    def boolean(self, name: str, default: bool) -> bool:
        v = self.data.get(name, default)
        if not isinstance(v, bool):
            raise _bad(self.policy, self.path(name), v, "true or false")
        return v

    def only(self, allowed: set[str]) -> None:
        for k in self.data:
            if k not in allowed:
                hint = _suggest(str(k), allowed)
                value = _short(self.data[k])
                raise InvalidPolicyError(
                    f"policy {self.policy!r}: unknown field {self.path(str(k))!r} = {value}{hint} "
                    f"(known: {', '.join(sorted(allowed))})",
                    policy=self.policy,
                    field=self.path(str(k)),
                )

    def mapping(self, name: str) -> _Reader:
        v = self.data[name]
        if not isinstance(v, Mapping):
            raise _bad(self.policy, self.path(name), v, "a mapping")
        return _Reader(self.policy, v, f"{self.where}{name}.")


def _suggest(name: str, known: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_rate(r: _Reader, strategy: str) -> RateSpec:
    name = r.policy
    for k in r.data:
        if k in _RATE_FIELDS and k not in _STRATEGY_FIELDS[strategy]:
            raise InvalidPolicyError(
                f"policy {name!r}: field {k!r} = {_short(r.data[k])} does not apply to "
                f"strategy {strategy!r} "
                f"(it takes: {', '.join(sorted(_STRATEGY_FIELDS[strategy]))})",
                policy=name,
                field=k,
            )
    if strategy == "gcra":
        limit = r.integer("limit")
        burst = r.integer("burst", default=1)
        return RateSpec("gcra", limit=limit, period_ms=r.duration("period", "periodMs"), burst=burst)
    if strategy == "tokenBucket":
        return RateSpec(
            "tokenBucket", capacity=r.integer("capacity"), refill_per_sec=r.number("refillPerSec")
        )
    window = r.duration("windowMs", "window", "period", "periodMs")
    if strategy == "fixedWindow":
        return RateSpec("fixedWindow", limit=r.integer("limit"), window_ms=window)
    if strategy == "slidingWindow":
        buckets = r.integer("buckets", default=10, maximum=1000)
        if window % buckets:
            raise _bad(name, "buckets", buckets, f"a divisor of the window ({window} ms)")
        return RateSpec("slidingWindow", limit=r.integer("limit"), window_ms=window, buckets=buckets)
    return RateSpec("slidingWindowLog", limit=r.integer("limit", maximum=MAX_LOG_LIMIT), window_ms=window)


def _parse_budgets(r: _Reader) -> tuple[BudgetSpec, ...]:
    raw = r.data["tokenBudget"]
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise _bad(r.policy, "tokenBudget", raw, "a mapping {budget, windowMs} or a non-empty list of them")
    out = []
    for i, item in enumerate(items):
        where = "tokenBudget." if not isinstance(raw, list) else f"tokenBudget[{i}]."
        if not isinstance(item, Mapping):
            raise _bad(r.policy, where.rstrip("."), item, "a mapping {budget, windowMs}")
        b = _Reader(r.policy, item, where)
        b.only({"budget", "windowMs", "window"})
        out.append(BudgetSpec(budget=b.integer("budget"), window_ms=b.duration("windowMs", "window")))
    windows = [b.window_ms for b in out]
    if len(set(windows)) != len(windows):
        raise _bad(r.policy, "tokenBudget", raw, "budgets with distinct windows")
    return tuple(out)


def _parse_concurrency(r: _Reader) -> ConcurrencySpec:
    c = r.mapping("concurrency")
    c.only({"minLimit", "maxLimit", "perKey", "leaseTtl"})
    if not c.has("minLimit") and not c.has("maxLimit"):
        raise InvalidPolicyError(
            f"policy {r.policy!r}: field 'concurrency' needs maxLimit (and optionally minLimit)",
            policy=r.policy,
            field="concurrency.maxLimit",
        )
    mx = c.integer("maxLimit", default=c.integer("minLimit", default=1), maximum=100_000)
    mn = c.integer("minLimit", default=mx)
    if mn > mx:
        raise _bad(r.policy, "concurrency.minLimit", mn, f"minLimit <= maxLimit ({mx})")
    ttl = c.duration("leaseTtl", default=30_000)
    if ttl < 1000:
        raise _bad(r.policy, "concurrency.leaseTtl", c.data["leaseTtl"], "a lease TTL of at least 1s")
    return ConcurrencySpec(min_limit=mn, max_limit=mx, per_key=c.boolean("perKey", False), lease_ttl_ms=ttl)


def _parse_deferral(r: _Reader) -> DeferralSpec:
    if not r.has("deferral"):
        return DeferralSpec()
    d = r.mapping("deferral")
    d.only({"maxDeferrals", "onExhausted", "jitter", "park"})
    return DeferralSpec(
        max_deferrals=d.integer("maxDeferrals", default=1000, minimum=0),  # 0: on_exhausted at once
        on_exhausted=cast(Literal["fail", "run"], d.choice("onExhausted", ("fail", "run"), "fail")),
        jitter_ms=d.duration("jitter", default=50),
        park=cast(Literal["auto", "always", "never"], d.choice("park", ("auto", "always", "never"), "auto")),
    )


MAX_PROVIDER_HOLD_MS = 86_400_000


def _parse_provider(r: _Reader) -> ProviderSpec:
    if not r.has("provider"):
        return ProviderSpec()
    d = r.mapping("provider")
    d.only({"maxHold", "maxDeferrals", "horizon"})
    hold = d.duration("maxHold", default=3_600_000)
    if not 1000 <= hold <= MAX_PROVIDER_HOLD_MS:
        raise _bad(r.policy, "provider.maxHold", d.data["maxHold"], "a duration from 1s to 1d")
    horizon = d.duration("horizon", default=10_000)
    if not 100 <= horizon <= MAX_PROVIDER_HOLD_MS:
        raise _bad(r.policy, "provider.horizon", d.data["horizon"], "a duration from 100ms to 1d")
    return ProviderSpec(
        max_hold_ms=hold,
        max_deferrals=d.integer("maxDeferrals", default=20, minimum=0, maximum=10_000),
        horizon_ms=horizon,
    )


def _parse_fairness(r: _Reader) -> FairnessSpec:
    if not r.has("fairness"):
        return FairnessSpec()
    f = r.mapping("fairness")
    f.only({"weights", "defaultWeight"})
    default = f.number("defaultWeight") if f.has("defaultWeight") else 1.0
    weights: list[tuple[str, float]] = []
    if f.has("weights"):
        w = f.mapping("weights")
        for k in w.data:
            if not isinstance(k, str) or not k:
                raise _bad(r.policy, "fairness.weights", k, "fair keys as non-empty strings")
            weights.append((k, w.number(k)))
    return FairnessSpec(weights=tuple(weights), default_weight=default, declared=True)


def _default_grace(rate: RateSpec | None) -> int:
    """A booked slot is honoured up to one emission interval late (at least 100 ms). A task that comes back
    later (a busy worker, an outage) pays again instead: late starts then never bunch up above the limit,
    since every start lies within one interval of the slot it was granted."""
    if rate is None or rate.strategy != "gcra":
        return 100
    return max(100, -(-rate.period_ms // rate.limit))


def parse_policy(name: str, data: object) -> Policy:
    """Validate one policy mapping (the value under ``limiters: NAME:``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidPolicyError(
            f"policy name {name!r}: expected 1-128 characters of letters, digits, '_', '.', '-'",
            policy=str(name),
            field="name",
        )
    if not isinstance(data, Mapping):
        raise _bad(name, "(policy)", data, "a mapping of fields")
    for k, why in _UNSUPPORTED_TK_KEYS.items():
        if k in data:
            raise InvalidPolicyError(
                f"policy {name!r}: field {k!r} ({why}) is a ThrottleKit option taskgate does not implement; "
                "taskgate enforces one exact limit per Redis (or Redis Cluster): remove the key",
                policy=name,
                field=k,
            )
    clean = {k: v for k, v in data.items() if k not in _ACCEPTED_TK_KEYS}
    for k in data:
        if k in _ACCEPTED_TK_KEYS:
            log.info("policy %r: %s", name, _ACCEPTED_TK_KEYS[k])
    r = _Reader(name, clean)
    r.only(_POLICY_KEYS)
    rate = None
    if r.has("strategy"):
        strategy = clean["strategy"]
        if strategy not in STRATEGIES:
            raise _bad(name, "strategy", strategy, " or ".join(STRATEGIES))
        rate = _parse_rate(r, strategy)
    else:
        stray = sorted(k for k in clean if k in _RATE_FIELDS)
        if stray:
            raise InvalidPolicyError(
                f"policy {name!r}: field {stray[0]!r} needs a 'strategy' ({' or '.join(STRATEGIES)})",
                policy=name,
                field=stray[0],
            )
    arithmetic = r.choice("arithmetic", ("throttlekit", "tolerant"), "throttlekit")
    if arithmetic == "tolerant":
        if rate is None:
            raise _bad(name, "arithmetic", clean["arithmetic"], "a rate axis ('strategy') to apply to")
        rate = replace(rate, tolerant=True)
    budgets = _parse_budgets(r) if r.has("tokenBudget") else ()
    concurrency = _parse_concurrency(r) if r.has("concurrency") else None
    if rate is None and concurrency is None and not budgets:
        raise InvalidPolicyError(
            f"policy {name!r}: no axis: give a 'strategy' (rate), 'concurrency' or 'tokenBudget'",
            policy=name,
            field="strategy",
        )
    gcra = rate is not None and rate.strategy == "gcra"
    if clean.get("bookingHorizon") in (0, "0"):
        horizon = 0  # booking off
    else:
        horizon = r.duration("bookingHorizon", default=60_000 if gcra else 0)
    if horizon and not gcra:
        raise _bad(name, "bookingHorizon", clean["bookingHorizon"], "booking only on a gcra rate axis")
    if r.has("description") and not isinstance(clean["description"], str):
        raise _bad(name, "description", clean["description"], "a string")
    return Policy(
        name=name,
        rate=rate,
        concurrency=concurrency,
        budgets=budgets,
        accounting=cast(Literal["escrow", "debit"], r.choice("accounting", ("escrow", "debit"), "escrow")),
        fail=cast(Literal["open", "closed"], r.choice("fail", ("open", "closed"), "closed")),
        booking_horizon_ms=horizon,
        booking_grace_ms=r.duration("bookingGrace", default=_default_grace(rate)),
        deferral=_parse_deferral(r),
        counters=r.boolean("counters", True),
        provider=_parse_provider(r),
        fairness=_parse_fairness(r),
    )


def load_policies(source: PolicySource) -> Policies:
    """Load policies from a file path, a YAML string, a mapping (the file's shape or just ``{name: policy}``),
    or an existing :class:`Policies`."""
    if source is None:
        return Policies()
    if isinstance(source, Policies):
        return source
    where = "<mapping>"
    data: object
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _is_path(source)):
        path = Path(source)
        if not path.is_file():
            raise InvalidPolicyError(f"policy file {os.fspath(source)!r} not found")
        where = str(path)
        data = _yaml(path.read_text(encoding="utf-8"), where)
    elif isinstance(source, str):
        where = "<yaml>"
        data = _yaml(source, where)
        if not isinstance(data, Mapping) and "\n" not in source:
            raise InvalidPolicyError(
                f"policy file {source!r} not found (and the string is not YAML text with 'limiters:')"
            )
    else:
        data = source
    if not isinstance(data, Mapping):
        raise InvalidPolicyError(
            f"{where}: expected a mapping with 'version: 1' and 'limiters:', got {data!r}"
        )
    if "limiters" in data or "version" in data:
        extra = sorted(set(data) - {"version", "limiters"})
        if extra:
            raise InvalidPolicyError(
                f"{where}: unknown top-level key {extra[0]!r} (expected 'version' and 'limiters')",
                field=extra[0],
            )
        version = data.get("version", 1)
        if version != 1 or isinstance(version, bool):
            raise InvalidPolicyError(
                f"{where}: 'version' = {version!r}: only version 1 is known", field="version"
            )
        limiters = data.get("limiters")
        if not isinstance(limiters, Mapping):
            raise InvalidPolicyError(
                f"{where}: 'limiters' must be a mapping of name -> policy", field="limiters"
            )
    else:
        limiters = data
    return Policies({str(name): parse_policy(name, spec) for name, spec in limiters.items()})


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (PyYAML keeps the last silently, so
    ``limit: 10`` followed by ``limit: 100`` would be misread without a word)."""


def _unique_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _is_path(text: str) -> bool:
    """A one-line string is a path if it has no ':' (YAML text of policies has one) or names a file
    (``/etc/taskgate:prod/policies.yaml``, ``C:\\taskgate.yaml``)."""
    if "\n" in text:
        return False
    if ":" not in text:
        return True
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # too long for a path, NUL ...
        return False


def _yaml(text: str, where: str) -> object:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.YAMLError as e:
        raise InvalidPolicyError(f"{where}: not valid YAML: {e}") from e
