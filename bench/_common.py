"""Shared helpers for taskgate's benchmarks (``bench/*.py``): timing loops, percentiles, tables, the machine
description and ``--record`` into ``bench/RESULTS.md``.

Every benchmark measures the user-visible per-call cost: one thread, synchronous calls, one client connection,
``time.perf_counter_ns`` around each call (so the loop overhead, ~0.1 µs, is included the same way in every
measurement), a warm-up first, time-based loops, and either several rounds in alternating order keeping the
best (:func:`run_rounds`: one contiguous loop per measurement and round) or the measurements cut in short
slices that take turns all along the run (:func:`run_interleaved`, with :func:`paired_ratio`), so that a
ratio is not skewed by whatever the other core happens to be doing. On a machine shared with other busy
processes the second is the robust one.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "BENCH_DIR",
    "RESULTS_MD",
    "Call",
    "Measurement",
    "Result",
    "Selection",
    "SliceMeasurement",
    "SlicedResult",
    "delete_prefix",
    "fmt_rate",
    "git_revision",
    "machine_info",
    "percentile",
    "pin",
    "ping_p50_us",
    "ratio_line",
    "record",
    "redis_cpu",
    "paired_ratio",
    "run_interleaved",
    "run_rounds",
    "stopwatch",
    "table",
    "timed_loop",
    "timed_slice",
    "warm",
]

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"


class _ScanDel(Protocol):
    """The slice of a redis-py client that :func:`delete_prefix` needs."""

    def scan_iter(self, match: str, count: int) -> Iterator[Any]: ...

    def unlink(self, *names: Any) -> Any: ...


@dataclass
class Result:
    """One timed loop: ``calls`` calls in ``elapsed_ns``; ``items`` units of work per call (e.g. keys)."""

    name: str
    calls: int
    elapsed_ns: int
    latencies_ns: list[int] = field(repr=False)
    items: int = 1

    @property
    def ops(self) -> float:
        """Calls per second."""
        return self.calls * 1e9 / self.elapsed_ns if self.elapsed_ns else 0.0

    @property
    def item_rate(self) -> float:
        """Items (keys) per second."""
        return self.ops * self.items

    def pct_us(self, q: float) -> float:
        return percentile(self.latencies_ns, q) / 1000.0

    @property
    def p50_us(self) -> float:
        return self.pct_us(50)

    @property
    def p99_us(self) -> float:
        return self.pct_us(99)


def percentile(sorted_ns: Sequence[int], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of an already *sorted* sequence."""
    if not sorted_ns:
        return 0.0
    rank = max(1, min(len(sorted_ns), round(q / 100.0 * len(sorted_ns) + 0.5)))
    return float(sorted_ns[rank - 1])


def timed_loop(
    name: str,
    fn: Callable[[int], object],
    seconds: float,
    *,
    warmup: float = 0.3,
    items: int = 1,
) -> Result:
    """Call ``fn(i)`` (``i`` = 0, 1, 2 ...) for ``warmup`` seconds untimed, then for ``seconds`` seconds with
    ``perf_counter_ns`` around every call. The counter keeps running across the warm-up so that keys derived
    from it stay distinct."""
    clock = time.perf_counter_ns
    i = 0
    end = clock() + int(warmup * 1e9)
    while clock() < end or i < 20:
        fn(i)
        i += 1
    lat: list[int] = []
    append = lat.append
    start = clock()
    deadline = start + int(seconds * 1e9)
    t1 = start
    n = 0
    while t1 < deadline:
        t0 = clock()
        fn(i)
        t1 = clock()
        append(t1 - t0)
        i += 1
        n += 1
    lat.sort()
    return Result(name, n, t1 - start, lat, items)


@dataclass
class Measurement:
    """A named benchmark: ``run(seconds)`` sets up its own client, warms up, measures and cleans up."""

    name: str
    run: Callable[[float], Result]


@dataclass
class Selection:
    """Per measurement: the chosen round (the best, i.e. highest calls/s) and every round's calls/s."""

    best: dict[str, Result]
    rounds: dict[str, list[float]]

    def spread(self, name: str) -> str:
        xs = self.rounds[name]
        if len(xs) < 2:
            return ""
        return f"{(max(xs) - min(xs)) / statistics.median(xs) * 100:.0f}%"


def run_rounds(
    measurements: Sequence[Measurement],
    seconds: float,
    rounds: int,
    *,
    progress: Callable[[str], None] | None = None,
) -> Selection:
    """Run every measurement ``rounds`` times, the order reversed on every other round (A B C, C B A, ...),
    and keep for each the round with the highest calls/s: noise (the other core busy, GC, a Redis fork) only
    ever slows a loop down, so the best round is the closest to the true cost and two figures taken in the
    same run are compared under the same conditions."""
    best: dict[str, Result] = {}
    per_round: dict[str, list[float]] = {m.name: [] for m in measurements}
    for r in range(rounds):
        order = list(measurements) if r % 2 == 0 else list(reversed(measurements))
        for m in order:
            if progress is not None:
                progress(f"round {r + 1}/{rounds}: {m.name}")
            res = m.run(seconds)
            per_round[m.name].append(res.ops)
            if m.name not in best or res.ops > best[m.name].ops:
                best[m.name] = res
    return Selection(best, per_round)


# -- interleaved slices (bench/decisions.py): robust ratios on a machine shared with other processes --------


@dataclass
class SlicedResult(Result):
    """A :class:`Result` summed over interleaved slices, with each slice's calls/s."""

    slice_ops: list[float] = field(default_factory=list)

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-slice calls/s: how much the conditions moved during the run."""
        xs = self.slice_ops
        if len(xs) < 2 or not statistics.median(xs):
            return 0.0
        return (max(xs) - min(xs)) / statistics.median(xs)


Call = Callable[[int], object]


@dataclass
class SliceMeasurement:
    """A named benchmark for :func:`run_interleaved`. ``setup()`` opens its client and returns the call to
    time (``fn(i)``, ``i`` = 0, 1, 2 ... so keys derived from it stay distinct) and a function that closes
    the client."""

    name: str
    setup: Callable[[], tuple[Call, Callable[[], None]]]
    items: int = 1


def timed_slice(fn: Call, seconds: float, i: int, out: list[int]) -> tuple[int, int, int]:
    """Call ``fn(i)``, ``fn(i + 1)`` ... for ``seconds``, appending each call's ``perf_counter_ns`` latency
    to ``out``. Returns (calls, elapsed ns, next i)."""
    clock = time.perf_counter_ns
    append = out.append
    start = clock()
    deadline = start + int(seconds * 1e9)
    t1 = start
    n = 0
    while t1 < deadline:
        t0 = clock()
        fn(i)
        t1 = clock()
        append(t1 - t0)
        i += 1
        n += 1
    return n, t1 - start, i


def warm(fn: Callable[[int], object], seconds: float, i: int, minimum: int = 20) -> int:
    """Untimed calls for ``seconds`` (at least ``minimum``); returns the next i."""
    end = time.perf_counter_ns() + int(seconds * 1e9)
    n = 0
    while n < minimum or time.perf_counter_ns() < end:
        fn(i)
        i += 1
        n += 1
    return i


def run_interleaved(
    measurements: Sequence[SliceMeasurement],
    seconds: float,
    slices: int,
    *,
    warmup: float = 0.3,
    progress: Callable[[str], None] | None = None,
    before_slice: Callable[[], object] | None = None,
) -> dict[str, SlicedResult]:
    """Time every measurement for ``seconds`` in all, cut into ``slices`` slices that take turns (A B C ..,
    .. C B A, A B C ..): each measurement is sampled all along the run, so whatever else the machine does
    (another process on the other core, a Redis fork) hits all of them alike, and slice ``k`` of A ran next
    to slice ``k`` of B, which :func:`paired_ratio` compares. Every client stays open (one connection each)
    for the whole run; each is warmed up for ``warmup`` s first and for a few calls before each slice
    (``before_slice()``, if given, runs before each slice, untimed)."""
    opened: list[tuple[SliceMeasurement, Call, Callable[[], None]]] = []
    try:
        for m in measurements:
            fn, close = m.setup()
            opened.append((m, fn, close))
        lat: dict[str, list[int]] = {m.name: [] for m in measurements}
        calls = dict.fromkeys(lat, 0)
        elapsed = dict.fromkeys(lat, 0)
        per_slice: dict[str, list[float]] = {name: [] for name in lat}
        nxt = dict.fromkeys(lat, 0)
        for m, fn, _ in opened:
            nxt[m.name] = warm(fn, warmup, 0)
        for k in range(slices):
            if progress is not None:
                progress(f"slice {k + 1}/{slices}")
            order = opened if k % 2 == 0 else list(reversed(opened))
            for m, fn, _ in order:
                if before_slice is not None:
                    before_slice()
                i = warm(fn, 0.0, nxt[m.name], minimum=10)
                n, ns, nxt[m.name] = timed_slice(fn, seconds / slices, i, lat[m.name])
                calls[m.name] += n
                elapsed[m.name] += ns
                per_slice[m.name].append(n * 1e9 / ns if ns else 0.0)
    finally:
        for _, _, close in opened:
            close()
    out: dict[str, SlicedResult] = {}
    for m in measurements:
        lat[m.name].sort()
        out[m.name] = SlicedResult(
            m.name, calls[m.name], elapsed[m.name], lat[m.name], m.items, per_slice[m.name]
        )
    return out


def paired_ratio(num: SlicedResult, den: SlicedResult) -> float:
    """The median over the slices of ``num``'s calls/s over ``den``'s in the same slice (back to back)."""
    pairs = [a / b for a, b in zip(num.slice_ops, den.slice_ops, strict=True) if b]
    return statistics.median(pairs) if pairs else 0.0


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned (also valid Markdown-ish)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def ratio_line(label: str, num: float, den: float, target: float) -> tuple[str, bool]:
    """``label: 0.91x (target >= 0.85x) PASS``."""
    ratio = num / den if den else 0.0
    ok = ratio >= target
    return f"{label}: {ratio:.2f}x (target >= {target:.2f}x)  {'PASS' if ok else 'MISS'}", ok


def _run(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=BENCH_DIR).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def git_revision() -> str:
    """``git rev-parse --short HEAD``, plus ``+dirty`` when the work tree has changes."""
    rev = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return rev + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(redis_info: dict[str, Any] | None = None) -> dict[str, str]:
    """nproc, CPU model, Python and (given ``client.info()``) Redis version."""
    info = {
        "nproc": str(os.cpu_count() or "?"),
        "cpu": _cpu_model(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
    }
    if redis_info is not None:
        info["redis"] = str(redis_info.get("redis_version", "?"))
    return info


_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "")


def redis_cpu(url: str, redis_info: dict[str, Any]) -> int | None:
    """The CPU the Redis server's main thread last ran on, when the server is local and its process visible
    (``INFO server`` ``process_id`` + ``/proc/<pid>/stat``); else None."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "unix" and (parts.hostname or "") not in _LOCAL_HOSTS:
        return None
    pid = redis_info.get("process_id")
    try:
        if "redis" not in Path(f"/proc/{pid}/comm").read_text():
            return None
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[36])  # field 39, "processor"
    except (OSError, ValueError, IndexError):
        return None


def pin(cpu: int) -> bool:
    """Pin this process to ``cpu`` (Linux); False where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return False
    return True


def ping_p50_us(ping: Callable[[], object], n: int = 2000) -> float:
    """The median round trip of ``n`` PINGs: tells which scheduling regime the run is in."""
    for _ in range(100):
        ping()
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        ping()
        lat.append(time.perf_counter_ns() - t0)
    lat.sort()
    return percentile(lat, 50) / 1000.0


def delete_prefix(client: _ScanDel, prefix: str) -> int:
    """UNLINK every key that starts with ``prefix`` (SCAN, never KEYS/FLUSH*). Returns how many."""
    if not prefix or "*" in prefix:
        raise ValueError(f"refusing to delete with prefix {prefix!r}")
    n = 0
    batch: list[Any] = []
    for k in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(k)
        if len(batch) >= 500:
            client.unlink(*batch)
            n += len(batch)
            batch.clear()
    if batch:
        client.unlink(*batch)
        n += len(batch)
    return n


_RESULTS_HEADER = """# taskgate benchmark results

Each section below was appended by a benchmark (`bench/*.py`) run with `--record`; newest last. Reproduce
from the repository root, with a Redis on 127.0.0.1:6379 (the benchmarks use db 11 and delete only their own
keys), e.g.:

```
.venv/bin/python bench/decisions.py --record   # [--redis URL] [--seconds S] [--slice S] [--pin auto|none|N]
.venv/bin/python bench/decisions.py --profile  # + where taskgate's Python time goes (stub client, cProfile)
```

How `bench/decisions.py` takes its figures: one thread making synchronous calls over one client connection
per measurement (the user-visible per-call cost); `time.perf_counter_ns` around each call after a warm-up;
time-based loops. The measurements are cut into short slices that take turns (A B C .., .. C B A, ...) for
the whole run, so each is sampled all along it and noise from other processes hits them alike; a ratio is
the median over the slices of the two sides' calls/s in the same slice (they ran back to back). The table's
calls/s and percentiles are over all slices. By default the benchmark pins itself to the CPU the local Redis
server runs on (`--pin auto`): client and server then share a core and a round trip is a local context
switch. Without pinning, on a small VM a round trip is either that (~30 µs) or a cross-CPU wake-up (~100 µs)
depending on where the scheduler puts the two processes, which swings every ratio; the pinned, shared-core
setting is stable and is the stricter one (fixed per-call overheads are not diluted by wake-up latency).
Each section gives the PING round trip and the load average, to judge the noise.
"""


def record(title: str, body: str, meta: dict[str, str], path: Path = RESULTS_MD) -> None:
    """Append a section ``## title`` with ``date -u``, the git revision, ``meta`` and ``body`` (verbatim)."""
    date = _run(["date", "-u"]) or datetime.datetime.now(datetime.timezone.utc).strftime(
        "%a %b %d %H:%M:%S UTC %Y"
    )
    lines = [
        f"## {title} — {date}",
        "",
        f"- commit: `{git_revision()}`",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "```",
        body.rstrip("\n"),
        "```",
        "",
    ]
    if not path.exists() or not path.read_text(encoding="utf-8").strip():
        path.write_text(_RESULTS_HEADER, encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    sep = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    path.write_text(text + sep + "\n".join(lines), encoding="utf-8")


@contextmanager
def stopwatch(label: str, out: Callable[[str], None]) -> Iterator[None]:
    """Print how long a block took (for the whole run)."""
    t0 = time.perf_counter()
    yield
    out(f"{label}: {time.perf_counter() - t0:.1f} s")
