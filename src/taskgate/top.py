"""``taskgate top``: a live view of every policy, fleet-wide, from the counters the engine keeps in the store.

::

    taskgate top --redis redis://host:6379/0 --config policies.yaml [--prefix P]   # read the store
    taskgate top --grpc host:50051 [--secret-file F]                            # through the Monitor door
    taskgate top --grpc grpcs://host:50051 --tls-ca ca.pem [--tls-cert C --tls-key K]        # ... over TLS
    taskgate top ... --once [--json]                                            # one snapshot, for scripts

Per policy: admitted, denied and booked per second (over the last ``--rate`` seconds), the binding axis (the
one that denied most), slots in flight against the limit, the estimated wait handed to deferred work (the mean
``retry_after`` of recent denials) and the totals; per policy the top throttled keys and spenders, with each
key's token budget as a bar; the waiting rooms (waiting, on the way, oldest and mean wait) and, per policy
whose tasks have a fair key, its top fair keys: their share of the starts over the last minute against their
weight's share, and their tasks waiting. The view refreshes in place until Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from typing import Any, Protocol

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from taskgate.stats import KeyView, PolicyView, Snapshot
from taskgate.waiting_view import WaitingView

__all__ = ["GrpcSource", "RedisSource", "Source", "render", "run"]

BAR = 20


class Source(Protocol):
    name: str

    def snapshot(self) -> Snapshot: ...

    def close(self) -> None: ...


class RedisSource:
    """Reads the store directly (any Redis, a cluster, or ``memory://`` in this process)."""

    def __init__(self, url: str, policies: Any, prefix: str, *, rate_s: int = 5, top: int = 5) -> None:
        from taskgate.backends import connect
        from taskgate.backends.redis import RedisBackend, redact

        b = connect(url, policies, prefix=prefix)
        if not isinstance(b, RedisBackend):
            raise ValueError(f"--redis {url!r}: expected redis://, rediss://, unix:// or redis+cluster://")
        self._b = b
        self.rate_s, self.top = rate_s, top
        self.name = f"{redact(url)} prefix {prefix!r}"

    def snapshot(self) -> Snapshot:
        from taskgate.stats import read_snapshot
        from taskgate.waiting_view import read_waiting

        b = self._b
        snap = read_snapshot(b.client, b.policies, b.prefix, rate_s=self.rate_s, top=self.top)
        return dataclasses.replace(snap, waiting=read_waiting(b, snap.generated_at))

    def close(self) -> None:
        self._b.client.close()


class GrpcSource:
    """Reads through a server's Monitor door (``GetSnapshot``). A ThrottleKit server (no taskgate JSON in the
    snapshot) gives the counts it has: allowed and denied over its window, and its top denied keys."""

    def __init__(
        self,
        target: str,
        *,
        secret: str | None = None,
        timeout: float = 5.0,
        root_certificates: str | bytes | None = None,
        certificate_chain: str | bytes | None = None,
        private_key: str | bytes | None = None,
    ) -> None:
        """``target``: ``host:port``, ``grpc://host:port`` or ``grpcs://host:port`` (TLS). The PEM arguments
        (bytes, PEM text or a file path) are as :class:`~taskgate.ServiceBackend`'s: any of them means TLS;
        ``certificate_chain`` with ``private_key`` is mutual TLS."""
        import grpc

        from taskgate._proto import throttlekit_pb2_grpc as pbg
        from taskgate.backends.service import parse_target, read_pem

        secure = False
        if target.startswith(("grpc://", "grpcs://")):
            target, secure = parse_target(target)
        root = read_pem(root_certificates, "root_certificates")
        chain, key = read_pem(certificate_chain, "certificate_chain"), read_pem(private_key, "private_key")
        if (chain is None) != (key is None):
            raise ValueError(
                "a client certificate and its key go together (mutual TLS): give both or neither"
            )
        secure = secure or any(x is not None for x in (root, chain, key))
        if secure:
            creds = grpc.ssl_channel_credentials(root, key, chain)
            self._channel = grpc.secure_channel(target, creds)
        else:
            self._channel = grpc.insecure_channel(target)
        self._stub = pbg.MonitorStub(self._channel)
        self._meta = [("authorization", f"Bearer {secret}")] if secret else None
        self._timeout = timeout
        self.name = f"{'grpcs' if secure else 'grpc'} {target}"

    def snapshot(self) -> Snapshot:
        from taskgate._proto import throttlekit_pb2 as pb

        r = self._stub.GetSnapshot(pb.GetSnapshotRequest(), timeout=self._timeout, metadata=self._meta)
        return snapshot_of_proto(r.snapshot)

    def close(self) -> None:
        self._channel.close()


def snapshot_of_proto(s: Any) -> Snapshot:
    """A Snapshot from a Monitor ``Snapshot`` message (taskgate's JSON when present)."""
    if s.raw_json:
        try:
            return Snapshot.from_json(s.raw_json)
        except (ValueError, KeyError, TypeError):
            pass
    from taskgate.stats import Counters, KeyCount

    window_s = max(1, s.meta.window_ms // 1000)
    pols = []
    for p in s.policies:
        c = Counters(allowed=p.allowed, denied_rate=p.denied)
        pols.append(
            PolicyView(
                name=p.name,
                kind=p.kind,
                strategy=p.strategy,
                limit=p.limit,
                counters=True,
                totals=c,
                window=c,
                recent=c,
                rate_s=float(window_s),
                top_denied=tuple(KeyCount(k.key, k.count) for k in p.top_denied),
            )
        )
    return Snapshot(s.meta.generated_at, window_s, window_s, "", tuple(pols))


# -- rendering -----------------------------------------------------------------------------------------------


def _rate(v: float) -> str:
    return f"{v:,.1f}" if v else "0"


def _ms(v: int | None) -> str:
    if v is None:
        return "-"
    if v < 10_000:
        return f"{v} ms"
    if v < 600_000:
        return f"{v / 1000:.1f} s"
    if v < 36_000_000:
        return f"{v / 60_000:.1f} min"
    return f"{v / 3_600_000:.1f} h"


def _bar(used: int, budget: int, unicode: bool) -> Text:
    frac = min(1.0, used / budget) if budget > 0 else 0.0
    full = round(frac * BAR)
    fill, empty = ("█", "░") if unicode else ("#", "-")
    style = "red" if frac >= 0.9 else "yellow" if frac >= 0.6 else "green"
    t = Text()
    t.append(fill * full, style=style)
    t.append(empty * (BAR - full), style="dim")
    t.append(f" {used:,}/{budget:,}")
    return t


def _slots(p: PolicyView) -> str:
    if p.inflight is not None:
        return f"{p.inflight}/{p.concurrency_limit}"
    if p.per_key:
        return f"≤{p.concurrency_limit}/key"
    return "-"


def _table(title: str) -> Table:
    return Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", expand=False, pad_edge=False)


def _name_width(snap: Snapshot) -> int:
    return max([6, *(len(p.name) for p in snap.policies)])


def _policies(snap: Snapshot) -> Table:
    t = _table("Policies")
    t.add_column("Policy", no_wrap=True, min_width=_name_width(snap))
    t.add_column("Kind", no_wrap=True)
    for name in ("Admit/s", "Deny/s", "Booked/s"):
        t.add_column(name, justify="right", no_wrap=True)
    t.add_column("Binding", no_wrap=True)
    t.add_column("In flight", justify="right", no_wrap=True)
    t.add_column("Est. wait", justify="right", no_wrap=True)
    for p in snap.policies:
        if not p.counters:
            t.add_row(p.name, p.kind, "off", "off", "off", "-", _slots(p), "-")
            continue
        t.add_row(
            Text(p.name, style="bold"),
            p.kind,
            _rate(p.rate("allowed")),
            Text(_rate(p.rate("denied")), style="red" if p.recent.denied else ""),
            _rate(p.rate("booked")),
            p.binding_axis or "-",
            _slots(p),
            _ms(p.est_wait_ms),
        )
    return t


# the Totals columns: (header, Counters field); tokens and leases only when a policy has that axis
TOTALS = (
    ("Allowed", "allowed"),
    ("Denied", "denied"),
    ("rate", "denied_rate"),
    ("conc", "denied_concurrency"),
    ("cost", "denied_cost"),
    ("Booked", "booked"),
)
TOKENS = (("Tok rsv", "tokens_reserved"), ("charged", "tokens_charged"), ("refunded", "tokens_refunded"))
LEASES = (("Leases", "leases_acquired"), ("released", "leases_released"), ("reclaimed", "leases_reclaimed"))
PROVIDER = (("prov", "denied_provider"), ("429s", "provider_429s"), ("held ms", "provider_hold_ms"))


def totals_columns(snap: Snapshot) -> list[tuple[str, str]]:
    cols = list(TOTALS)
    if any("cost" in p.axes for p in snap.policies):
        cols += TOKENS
    if any("concurrency" in p.axes for p in snap.policies):
        cols += LEASES
    if any(p.totals.provider_429s or p.totals.denied_provider for p in snap.policies):
        cols += PROVIDER  # the provider said something (taskgate.provider): its denials, 429s, hold time
    return cols


def _totals(snap: Snapshot) -> Table:
    t = _table("Totals")
    t.add_column("Policy", no_wrap=True, min_width=_name_width(snap))
    cols = totals_columns(snap)
    for name, _ in cols:
        t.add_column(name, justify="right", no_wrap=True)
    for p in snap.policies:
        if p.counters:
            t.add_row(p.name, *(f"{getattr(p.totals, f):,}" for _, f in cols))
    return t


def _keys(p: PolicyView, now: int, unicode: bool) -> Table:
    t = _table(f"Top keys: {p.name}")
    t.add_column("Key", no_wrap=True, min_width=min(20, max(len(k.key) for k in p.keys)), max_width=40)
    t.add_column("Denied", justify="right", no_wrap=True)
    t.add_column("Spent", justify="right", no_wrap=True)
    t.add_column("Budget", no_wrap=True)
    t.add_column("Resets in", justify="right", no_wrap=True)
    t.add_column("Slots", justify="right", no_wrap=True)
    provider = any(k.held_until or k.provider_limit for k in p.keys)
    if provider:
        t.add_column("Provider", no_wrap=True)
    for k in p.keys:
        cells = _key_cells(k, now, unicode)
        if provider:
            cells.append(_provider_cell(p, k, now))
        t.add_row(*cells)
    return t


def _key_cells(k: KeyView, now: int, unicode: bool) -> list[RenderableType]:
    b = min(k.budgets, key=lambda b: b.budget - b.used) if k.budgets else None
    return [
        k.key,
        f"{k.denied:,}",
        f"{k.spent:,}" if k.spent else "-",
        _bar(b.used, b.budget, unicode) if b else "-",
        _ms(max(0, b.resets_at - now)) if b else "-",
        f"{k.inflight}/{k.limit}" if k.inflight is not None else "-",
    ]


def _waiting(snap: Snapshot) -> Table:
    """Per policy: tasks waiting in the engine, promoted on their way, the oldest wait, the time to drain
    them at the policy's rate, and the mean wait of the tasks claimed so far."""
    t = _table("waiting rooms")
    for col in ("policy", "keys", "waiting", "on the way", "oldest wait", "drain in", "mean wait"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for w in snap.waiting:
        oldest = (snap.generated_at - w.oldest_parked_at) / 1000 if w.oldest_parked_at else 0.0
        mean = w.wait_sum_ms / w.claimed / 1000 if w.claimed else 0.0
        t.add_row(
            w.policy, str(w.rooms), str(w.waiting), str(w.handed_off), f"{oldest:.1f}s",
            "-" if w.drain_s is None else f"{w.drain_s:.0f}s", f"{mean:.1f}s",
        )  # fmt: skip
    return t


def _fair(w: WaitingView) -> Table:
    """The top fair keys of one policy: share of the starts (last minute) against the weight's share."""
    t = _table(f"fair share: {w.policy}")
    for col in ("fair key", "starts/min", "share", "weight", "weight share", "waiting"):
        t.add_column(col, justify="left" if col == "fair key" else "right", no_wrap=True)
    for f in w.fair:
        gap = f.start_share - f.weight_share
        style = "yellow" if f.waiting and gap < -0.1 else ""  # backlogged yet well under its share
        t.add_row(
            f.fair_key, f"{f.starts:,.0f}", Text(f"{f.start_share:.0%}", style=style),
            f"{f.weight:g}" if f.weight else "-", f"{f.weight_share:.0%}", f"{f.waiting:,}",
        )  # fmt: skip
    return t


def _provider_cell(p: PolicyView, k: KeyView, now: int) -> Text:
    """What the provider says about the key: a hold, and its reported pace against the configured limit."""
    parts = []
    if k.held_until > now:
        parts.append(("held " + _ms(k.held_until - now), "bold red"))
    if k.provider_rate:
        mine = f"configured {p.limit}" + (f" ({p.strategy})" if p.strategy else "")
        parts.append((f"{k.provider_rate:.1f}/s (reports {k.provider_limit}); {mine}", ""))
    if not parts:
        return Text("-")
    return Text.assemble(*[x for part in parts for x in (part, ("  ", ""))][:-1])


def render(snap: Snapshot, source: str = "", *, unicode: bool = True) -> RenderableType:
    """The whole view of one snapshot."""
    at = dt.datetime.fromtimestamp(snap.generated_at / 1000, dt.timezone.utc).strftime("%H:%M:%S UTC")
    head = Text.assemble(
        ("taskgate top", "bold"),
        f"  {source}  {at}  rates over the last {snap.rate_s}s, top keys over the last minute or two",
    )
    parts: list[RenderableType] = [head, _policies(snap), _totals(snap)]
    if snap.waiting:
        parts.append(_waiting(snap))
        parts += [_fair(w) for w in snap.waiting if w.fair]
    parts += [_keys(p, snap.generated_at, unicode) for p in snap.policies if p.keys]
    return Group(*parts)


def run(
    source: Source,
    *,
    once: bool = False,
    as_json: bool = False,
    interval: float = 1.0,
    console: Console | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Show ``source``; with ``once`` print one snapshot and return. The exit status."""
    from rich.live import Live

    con = console or Console()
    if console is None and not con.is_terminal:
        con = Console(width=max(con.width, 200))  # a pipe or a file: whole rows, never cut
    unicode = (con.encoding or "").lower().startswith("utf")
    try:
        if once:
            snap = source.snapshot()
            if as_json:
                print(snap.to_json())
            else:
                con.print(render(snap, source.name, unicode=unicode))
            return 0
        with Live(console=con, auto_refresh=False, screen=False, transient=False) as live:
            while True:
                try:
                    view = render(source.snapshot(), source.name, unicode=unicode)
                except Exception as e:  # keep showing, say what is wrong
                    view = Text(f"taskgate top: {source.name}: {e}", style="red")
                live.update(view, refresh=True)
                sleep(interval)
    except KeyboardInterrupt:
        return 0
    finally:
        source.close()
