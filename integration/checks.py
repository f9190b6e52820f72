"""The battle's verdict: what every execution recorded, checked against what the policies promise.

Pure functions over :class:`Evidence` (the records the task bodies wrote, what the harness enqueued, and the
faults it injected); each check gives a :class:`Check` with the figures behind it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from taskgate.policy import Policies
from tests.fleet import busiest_window

__all__ = ["Check", "Evidence", "Execution", "Kill", "Outage", "Pause", "evaluate"]

# A fail-open decision may complete this long after the store came back (a call that timed out, retried)
OUTAGE_GRACE_S = 2.5
# A task admitted just before the store stopped may start this long after (RQ forks its horse first)
CLOSED_GRACE_S = 0.75
# A killed holder's lease must stop counting within its TTL, plus the sampling granularity
RECLAIM_SLACK_S = 0.3


@dataclass
class Execution:
    ex: str
    id: str
    door: str
    policy: str
    tenant: str
    start: float
    pid: int
    est: int = 0
    leases: list[str] = field(default_factory=list)
    window: int | None = None
    deferrals: int = 0
    booked: bool | None = None
    fail_open: bool = False
    secs: float = 0.0
    end: float | None = None
    reclaimed: bool = False
    refunded: int = 0
    charged: int = 0
    settle_t: float | None = None
    released: list[bool] = field(default_factory=list)
    error: str = ""
    killed_at: float | None = None
    paused_at: float | None = None

    @classmethod
    def from_records(cls, start: dict[str, Any], end: dict[str, Any] | None) -> Execution:
        e = cls(
            ex=start["ex"],
            id=start["id"],
            door=start["door"],
            policy=start["policy"],
            tenant=start["tenant"],
            start=float(start["t"]),
            pid=int(start["pid"]),
            est=int(start.get("est", 0)),
            leases=list(start.get("leases", [])),
            window=start.get("window"),
            deferrals=int(start.get("deferrals", 0)),
            booked=start.get("booked"),
            fail_open=bool(start.get("fail_open", False)),
            secs=float(start.get("secs", 0.0)),
        )
        if end is not None:
            e.end = float(end["t"])
            e.reclaimed = bool(end.get("reclaimed", False))
            e.refunded = int(end.get("refunded", 0))
            e.charged = int(end.get("charged", 0))
            e.settle_t = end.get("settle_t")
            e.released = list(end.get("released", []))
            e.error = str(end.get("error", ""))
        return e


@dataclass
class Kill:
    """A SIGKILLed process that held a slot: a Celery pool child or an RQ horse."""

    kind: str
    task_id: str
    pid: int
    at: float
    lease: str
    expiry_left_s: float | None  # how long its lease still had to live when it was killed
    freed_after_s: float | None  # when the lease stopped counting (expired or reaped), after the kill


@dataclass
class Pause:
    """A Celery worker (main process and pool children) stopped with SIGSTOP past its lease TTL."""

    worker: str
    pids: list[int]
    at: float
    until: float
    task_id: str
    lease: str
    freed_after_s: float | None
    log_reclaimed: bool = False


@dataclass
class Outage:
    """A time the store (or, for some doors, their server) could not be reached."""

    what: str
    t0: float
    t1: float
    doors: frozenset[str] = frozenset({"A", "B", "R"})


@dataclass
class Evidence:
    variant: str
    policies: Policies
    lease_ttl_s: float
    enqueued: list[dict[str, Any]]
    executions: list[Execution]
    failures: list[dict[str, Any]]
    kills: list[Kill]
    pauses: list[Pause]
    outages: list[Outage]
    store_stop: Outage | None
    store_restart: dict[str, Any]
    serve_kill: dict[str, Any]
    sampled_leases: dict[str, int]  # lease set -> most live leases seen by the sampler
    sampled_budgets: dict[str, int]  # policy:tenant:window -> most charged seen by the sampler
    fault_errors: list[str]
    started_at: float
    ended_at: float


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)


def _fmt_t(ev: Evidence, t: float) -> str:
    return f"t+{t - ev.started_at:.1f}s"


def check_lost(ev: Evidence) -> Check:
    enq = {e["id"] for e in ev.enqueued}
    done = {x.id for x in ev.executions if x.end is not None}
    started = {x.id for x in ev.executions}
    lost = sorted(enq - done)
    stray = sorted(started - enq)
    details = [f"lost {i} (started: {i in started})" for i in lost[:20]]
    details += [f"ran but never enqueued: {i}" for i in stray[:20]]
    details += [f"task failure recorded: {f}" for f in ev.failures[:20]]
    ok = not lost and not stray
    return Check(
        "no task lost",
        ok,
        f"{len(enq)} enqueued, {len(done & enq)} completed, lost = {len(lost)}",
        details,
    )


def check_duplicates(ev: Evidence) -> Check:
    runs = Counter(x.id for x in ev.executions)
    victims = {k.task_id: k for k in ev.kills}
    twice = {i: n for i, n in runs.items() if n > 1}
    bad = [f"{i} ran {n} times" for i, n in twice.items() if i not in victims or n != 2]
    details = list(bad)
    for i, k in victims.items():
        ex = sorted((x for x in ev.executions if x.id == i), key=lambda x: x.start)
        again = [x for x in ex if x.start > k.at and x.end is not None]
        if not again:
            bad.append(f"{k.kind} victim {i} was not run again after the kill")
        details.append(
            f"{k.kind} victim {i}: {len(ex)} runs; redelivered "
            + (f"{again[0].start - k.at:.2f}s after the kill" if again else "never")
        )
    return Check(
        "nothing run twice except redelivery after a kill",
        not bad,
        f"{len(twice)} task(s) ran twice, all of them kill victims redelivered (acks_late / RQ Retry)"
        if not bad
        else f"{len(bad)} unexpected duplicate(s)",
        details,
    )


def _excluded(ev: Evidence, x: Execution) -> Outage | None:
    for o in ev.outages:
        if x.door in o.doors and o.t0 <= x.start <= o.t1 + OUTAGE_GRACE_S:
            return o
    return None


def check_rates(ev: Evidence) -> tuple[Check, dict[str, Any]]:
    details: list[str] = []
    figures: dict[str, Any] = {}
    ok = True
    excluded_total: Counter[str] = Counter()
    for name, p in ev.policies.items():
        if p.rate is None or name in ("sentinel", "probe"):
            continue
        assert p.rate.period_ms == 1000, "the rate check assumes per-second limits"
        cap = p.rate.limit + p.rate.burst + 1
        by_tenant: dict[str, list[Execution]] = defaultdict(list)
        for x in ev.executions:
            if x.policy != name:
                continue
            if p.fail == "open":
                o = _excluded(ev, x)
                if o is not None:
                    excluded_total[o.what] += 1
                    continue
            by_tenant[x.tenant].append(x)
        worst = (0, 0.0, "-")
        for tenant, xs in sorted(by_tenant.items()):
            n, at = busiest_window(x.start for x in xs)
            if n > worst[0]:
                worst = (n, at, tenant)
        over = max(0, worst[0] - cap)
        if over:
            inside = [x for x in by_tenant[worst[2]] if worst[1] <= x.start < worst[1] + 1.0]
            booked = sum(1 for x in inside if x.booked)
            deferred = sum(1 for x in inside if x.deferrals)
            details.append(
                f"{name}: the {len(inside)} starts of tenant {worst[2]} in [{_fmt_t(ev, worst[1])}, +1s): "
                f"by door {dict(Counter(x.door for x in inside))}; redeeming a booked slot (Celery, known): "
                f"{booked}; deferred before: {deferred}"
            )
        ok = ok and over == 0
        figures[name] = {"max": worst[0], "cap": cap, "limit": p.rate.limit, "burst": p.rate.burst}
        details.append(
            f"{name}: gcra {p.rate.limit}/s burst {p.rate.burst}: most starts in any 1 s window "
            f"{worst[0]} (tenant {worst[2]} at {_fmt_t(ev, worst[1])}); allowed limit+burst+1 = {cap}; "
            f"overshoot {over}"
        )
    if excluded_total:
        details.append(
            "excluded (fail: open policy, store or its server unreachable): "
            + ", ".join(f"{n} start(s) during {w}" for w, n in excluded_total.items())
        )
    figures["excluded"] = dict(excluded_total)
    overshoot = sum(max(0, f["max"] - f["cap"]) for k, f in figures.items() if k != "excluded")
    figures["overshoot"] = overshoot
    return Check(
        "rate caps in every 1 s window, per tenant", ok, f"overshoot = {overshoot}", details
    ), figures


def _interval(x: Execution, cut_paused: bool) -> tuple[float, float, bool]:
    """(start, end, finished) of an execution's body. A killed body ends at the kill; a body that never
    recorded its end and was not killed is unfinished (its planned length is used)."""
    end = x.end if x.end is not None else x.killed_at
    finished = end is not None
    if end is None:
        end = x.start + x.secs
    if cut_paused and x.paused_at is not None and end > x.paused_at:
        end = max(x.start, x.paused_at)
    return x.start, end, finished


def _peak(intervals: list[tuple[float, float]]) -> tuple[int, float]:
    events = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda v: (v[0], v[1])
    )
    cur = best = 0
    at = 0.0
    for t, d in events:
        cur += d
        if cur > best:
            best, at = cur, t
    return best, at


def check_inflight(ev: Evidence) -> tuple[Check, dict[str, Any]]:
    details: list[str] = []
    figures: dict[str, Any] = {}
    ok = True
    unfinished: list[str] = []
    for name, p in ev.policies.items():
        c = p.concurrency
        if c is None:
            continue
        groups: dict[str, list[Execution]] = defaultdict(list)
        for x in ev.executions:
            if x.policy == name:
                groups[x.tenant if c.per_key else "*"].append(x)
        worst, worst_all, where = 0, 0, ""
        for key, xs in sorted(groups.items()):
            cut = []
            full = []
            for x in xs:
                s, e, finished = _interval(x, cut_paused=True)
                if not finished:
                    unfinished.append(f"{x.id} ({x.door}, {name}) started {_fmt_t(ev, x.start)} never ended")
                cut.append((s, e))
                s2, e2, _ = _interval(x, cut_paused=False)
                full.append((s2, e2))
            n, at = _peak(cut)
            n_all, _ = _peak(full)
            if n > worst:
                worst, where = n, f"{key} at {_fmt_t(ev, at)}"
            worst_all = max(worst_all, n_all)
        sampled = max((v for k, v in ev.sampled_leases.items() if k.startswith(f"{name}:")), default=0)
        limit = c.max_limit
        ok = ok and worst <= limit and sampled <= limit
        scope = "per tenant" if c.per_key else "fleet-wide"
        figures[name] = {"max": worst, "limit": limit, "with_paused": worst_all, "sampled": sampled}
        details.append(
            f"{name}: limit {limit} {scope}: most bodies in flight {worst} ({where or '-'}); most live "
            f"leases sampled in the store {sampled}; counting the paused worker's reclaimed holder too: "
            f"{worst_all}"
        )
    ok = ok and not unfinished
    details += [f"unfinished execution: {u}" for u in unfinished[:20]]
    summary = ", ".join(f"{k} max {f['max']}/{f['limit']}" for k, f in figures.items())
    return Check("in-flight never above a concurrency limit", ok, summary, details), figures


def check_budgets(ev: Evidence) -> tuple[Check, dict[str, Any]]:
    """Escrow: the estimate is reserved at admission only if ``charged + estimate <= budget`` in the window
    of the admission, and ``settle`` refunds the difference within that window. What a settle charges
    (``charged > 0``: the actual above the estimate, or the whole actual when the reservation had expired,
    which is a plain debit with crossing semantics) lands in the window of the settle. The bound: per window,
    reserved - refunded <= budget; only those post-hoc debits may take a window past it (reported)."""
    details: list[str] = []
    figures: dict[str, Any] = {}
    ok = True
    for name, p in ev.policies.items():
        if not p.budgets:
            continue
        b = p.budgets[0]
        reserved: dict[tuple[str, int], int] = defaultdict(int)
        debits: dict[tuple[str, int], int] = defaultdict(int)
        approx = 0
        late: list[Execution] = []
        for x in ev.executions:
            if x.policy != name or not x.est:
                continue
            w = x.window
            if w is None:
                approx += 1
                w = int(x.start * 1000) // b.window_ms * b.window_ms
            if x.end is None or x.settle_t is None:
                reserved[(x.tenant, w)] += x.est  # never settled (killed): the estimate stays charged
                continue
            reserved[(x.tenant, w)] += x.est - x.refunded
            if x.charged:
                late.append(x)
                sw = int(x.settle_t * 1000) // b.window_ms * b.window_ms
                debits[(x.tenant, sw)] += x.charged
        worst = max(reserved.values(), default=0)
        exact = sum(1 for x in ev.executions if x.policy == name and x.est and x.window is not None)
        totals = {k: reserved.get(k, 0) + debits.get(k, 0) for k in set(reserved) | set(debits)}
        worst_total = max(totals.values(), default=0)
        crossed = {k: v for k, v in totals.items() if v > b.budget}
        sampled = {k: v for k, v in ev.sampled_budgets.items() if k.startswith(f"{name}:")}
        sampled_over = []
        for k, v in sampled.items():
            _, tenant, start = k.split(":")
            if v > b.budget + debits.get((tenant, int(start)), 0):
                sampled_over.append(f"sampled {k}: {v}")
        over = [
            f"{t} window {w}: reserved {v} > {b.budget}" for (t, w), v in reserved.items() if v > b.budget
        ]
        ok = ok and not over and not sampled_over
        figures[name] = {
            "max": worst,
            "budget": b.budget,
            "windows": len(reserved),
            "sampled": max(sampled.values(), default=0),
            "late_debits": len(late),
            "max_with_debits": worst_total,
        }
        details.append(
            f"{name}: {b.budget} tokens per {b.window_ms} ms window (escrow), {len(reserved)} "
            f"(tenant, window) pairs: most reserved-minus-refunded {worst} ({100 * worst / b.budget:.0f}%); "
            f"most charged seen by the sampler {figures[name]['sampled']}; windows read from the "
            f"reservation: {exact}, from the start time: {approx}"
        )
        if late:
            details.append(
                f"{name}: {len(late)} settle(s) charged post hoc (reservation expired: body > "
                f"{b.window_ms} ms, e.g. a paused worker; or actual > estimate): "
                + ", ".join(
                    f"{x.id[:8]} {x.charged} tokens, body {x.start:.0f}..{(x.end or 0):.0f}" for x in late[:5]
                )
                + f"; windows past the budget with them: {len(crossed)} (most {worst_total})"
            )
        details += over[:20] + sampled_over[:20]
    summary = ", ".join(f"{k} max {f['max']}/{f['budget']}" for k, f in figures.items())
    return Check("token budgets within their bounds", ok, summary, details), figures


def check_reclaim(ev: Evidence) -> tuple[Check, dict[str, Any]]:
    ttl = ev.lease_ttl_s
    details: list[str] = []
    ok = bool(ev.kills) and bool(ev.pauses)
    lat: dict[str, float | None] = {}
    for k in ev.kills:
        good = k.freed_after_s is not None and k.freed_after_s <= ttl + RECLAIM_SLACK_S
        ok = ok and good
        lat[k.kind] = k.freed_after_s
        left = "?" if k.expiry_left_s is None else f"{k.expiry_left_s:.2f}s"
        details.append(
            f"{k.kind} (pid {k.pid}, task {k.task_id}): lease had {left} to live at the kill; stopped "
            + (f"counting {k.freed_after_s:.2f}s after the kill" if k.freed_after_s is not None else "NEVER")
            + f" (TTL {ttl:.0f}s)"
        )
    for p in ev.pauses:
        good = p.freed_after_s is not None and p.freed_after_s <= ttl + RECLAIM_SLACK_S
        ok = ok and good
        lat["paused worker"] = p.freed_after_s
        details.append(
            f"paused worker {p.worker}: its lease stopped counting "
            + (f"{p.freed_after_s:.2f}s after SIGSTOP" if p.freed_after_s is not None else "NEVER")
        )
    summary = ", ".join(f"{k} {v:.2f}s" if v is not None else f"{k} never" for k, v in lat.items())
    return Check(
        f"reclaimed slots freed within their TTL ({ttl:.0f}s)", ok, summary or "no kills", details
    ), lat


def check_pause(ev: Evidence) -> Check:
    if not ev.pauses:
        return Check("paused worker learns its lease was reclaimed", False, "no pause was injected")
    details: list[str] = []
    ok = True
    for p in ev.pauses:
        runs = [x for x in ev.executions if x.id == p.task_id]
        ended = [x for x in runs if x.end is not None]
        reclaimed = any(x.reclaimed for x in ended)
        released = [r for x in ended for r in x.released]
        frees_nothing = bool(released) and not any(released)
        ok = ok and p.log_reclaimed and reclaimed and frees_nothing
        details.append(
            f"worker {p.worker} stopped {p.until - p.at:.1f}s (pids {p.pids}); its log has taskgate's "
            f"'reclaimed' warning: {p.log_reclaimed}; the task saw reclaimed={reclaimed}; its release after "
            f"resuming returned {released} (False: it freed nothing, so no other holder's slot)"
        )
    return Check("paused worker learns its lease was reclaimed; its release frees nothing", ok, "", details)


def check_fail_modes(ev: Evidence) -> Check:
    o = ev.store_stop
    if o is None:
        return Check("fail modes while the store is unreachable", False, "the store was not stopped")
    open_runs = [x for x in ev.executions if x.policy == "open_rate" and o.t0 <= x.start <= o.t1]
    closed = [
        x
        for x in ev.executions
        if ev.policies[x.policy].fail == "closed" and o.t0 + CLOSED_GRACE_S < x.start < o.t1
    ]
    ok = bool(open_runs) and not closed
    details = [
        f"store stopped {o.t1 - o.t0:.1f}s ({_fmt_t(ev, o.t0)} .. {_fmt_t(ev, o.t1)}): fail: open tasks "
        f"run meanwhile: {len(open_runs)} (by door {dict(Counter(x.door for x in open_runs))}); fail: closed "
        f"tasks started meanwhile (after {CLOSED_GRACE_S}s): {len(closed)}"
    ]
    details += [f"closed policy ran during the outage: {x.policy} {x.id} {x.door}" for x in closed[:10]]
    return Check(
        "fail: open runs and fail: closed defers while the store is down",
        ok,
        f"{len(open_runs)} fail-open runs, {len(closed)} fail-closed runs during the outage",
        details,
    )


def check_restart(ev: Evidence) -> Check:
    r = ev.store_restart
    if not r:
        return Check("store restart: state kept, scripts reloaded", False, "the store was not restarted")
    up = float(r["up"])
    after = Counter(
        x.door for x in ev.executions if ev.policies[x.policy].fail == "closed" and x.start > up + 0.5
    )
    doors_ok = all(after.get(d, 0) > 0 for d in ("A", "B", "R"))
    ok = bool(r.get("sentinel_kept")) and int(r.get("noscript", 0)) > 0 and doors_ok
    details = [
        f"down {r['up'] - r['down']:.2f}s at {_fmt_t(ev, r['down'])}; keys before/after: "
        f"{r.get('keys_before')}/{r.get('keys_after')}; a 1-per-hour state taken before the restart "
        f"still denies after it: {r.get('sentinel_kept')}",
        f"NOSCRIPT replies after the restart (script cache empty, reloaded): {r.get('noscript')}; "
        f"fail-closed tasks admitted after it, by door: {dict(after)}",
    ]
    return Check("store restart: state kept, NOSCRIPT recovered", ok, "", details)


def check_serve_kill(ev: Evidence) -> Check:
    s = ev.serve_kill
    if not s:
        return Check("taskgate serve killed and restarted", False, "no server was killed")
    b_after = [x for x in ev.executions if x.door == "B" and x.start > float(s["up"])]
    ok = bool(s.get("seen_down")) and bool(s.get("seen_up_again")) and bool(b_after)
    details = [
        f"server {s['name']} SIGKILLed at {_fmt_t(ev, s['killed'])}, restarted on the same port after "
        f"{s['up'] - s['killed']:.1f}s; the probe saw it down: {s.get('seen_down')}, answering again "
        f"{s.get('back_after', '?')}s after the kill; door B tasks started after the restart: {len(b_after)}"
    ]
    return Check("taskgate serve SIGKILLed and restarted on its port", ok, "", details)


def check_faults(ev: Evidence) -> Check:
    return Check(
        "every fault injected as planned",
        not ev.fault_errors,
        f"{len(ev.fault_errors)} fault(s) could not be injected" if ev.fault_errors else "all injected",
        list(ev.fault_errors),
    )


def evaluate(ev: Evidence) -> tuple[list[Check], dict[str, Any]]:
    figures: dict[str, Any] = {}
    checks = [check_faults(ev), check_lost(ev), check_duplicates(ev)]
    c, figures["rates"] = check_rates(ev)
    checks.append(c)
    c, figures["inflight"] = check_inflight(ev)
    checks.append(c)
    c, figures["budgets"] = check_budgets(ev)
    checks.append(c)
    c, figures["reclaim"] = check_reclaim(ev)
    checks.append(c)
    checks += [check_pause(ev), check_fail_modes(ev), check_restart(ev), check_serve_kill(ev)]
    figures["lost"] = len({e["id"] for e in ev.enqueued} - {x.id for x in ev.executions if x.end is not None})
    figures["redelivered"] = sum(1 for n in Counter(x.id for x in ev.executions).values() if n > 1)
    figures["deferrals"] = sum(x.deferrals for x in ev.executions)
    figures["executions"] = len(ev.executions)
    figures["enqueued"] = len(ev.enqueued)
    figures["by_door"] = dict(Counter(e["door"] for e in ev.enqueued))
    figures["by_policy"] = dict(Counter(e["policy"] for e in ev.enqueued))
    figures["wall_s"] = math.ceil(ev.ended_at - ev.started_at)
    return checks, figures
