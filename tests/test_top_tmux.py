"""`taskgate top` live, in a real terminal: a detached tmux session (on a private tmux server socket, killed
at the end) shows the dashboard while the test drives traffic; the assertions are on what a person would see
in the pane: the policies, counts that move, a token budget as a bar, the throttled key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

import taskgate
from tests.conftest import redis_up, require

URL = os.environ.get("TASKGATE_TEST_OPS_REDIS_URL", "redis://127.0.0.1:6379/4")
POLICIES = """
version: 1
limiters:
  api: {strategy: gcra, limit: 5, period: 1h, burst: 5}
  llm:
    strategy: gcra
    limit: 100
    period: 1h
    burst: 100
    concurrency: {maxLimit: 3}
    tokenBudget: {budget: 1000, window: 1d}
"""


class Tmux:
    """One tmux server of our own (``-L``): nothing else's sessions are seen or touched."""

    def __init__(self) -> None:
        self.socket = f"tgtop{uuid.uuid4().hex[:10]}"

    def __call__(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-u", "-L", self.socket, *args], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout

    def pane(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def wait_for(self, what: str, ok: Callable[[str], bool], timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.pane()
            if ok(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"the pane never showed {what}; last screen:\n{text}")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    require(shutil.which("tmux") is not None, "tmux", "apt-get install -y tmux")
    t = Tmux()
    yield t
    t.kill()


@pytest.fixture
def prefix() -> Iterator[str]:
    require(redis_up(URL), f"Redis at {URL}", "start redis-server on 127.0.0.1:6379")
    p = f"tgtop{uuid.uuid4().hex[:10]}"
    yield p
    r = redis.Redis.from_url(URL)
    keys = list(r.scan_iter(match=f"{p}:*", count=1000))
    if keys:
        r.unlink(*keys)
    r.close()


def totals_row(screen: str, policy: str) -> list[int] | None:
    """The numbers of ``policy``'s row in the Totals table on the screen."""
    after = screen.split("Totals", 1)
    if len(after) < 2:
        return None
    for line in after[1].splitlines():
        cells = line.split()
        if cells and cells[0] == policy and len(cells) == 13:
            return [int(c.replace(",", "")) for c in cells[1:]]
    return None


def allowed(screen: str, policy: str) -> int:
    row = totals_row(screen, policy)
    return row[0] if row else -1


def test_top_live_in_a_terminal(tmux: Tmux, prefix: str, tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICIES)
    cmd = [sys.executable, "-m", "taskgate.cli", "top", "--redis", URL, "--config", str(policies),
           "--prefix", prefix, "--interval", "0.25"]  # fmt: skip
    env = f"env -u COLUMNS -u LINES LANG=C.UTF-8 LC_ALL=C.UTF-8 TERM=xterm-256color PYTHONPATH={os.pathsep.join(sys.path)}"
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "60", f"{env} {' '.join(cmd)}")
    first = tmux.wait_for("the dashboard", lambda s: "taskgate top" in s and "Policies" in s)
    assert "api" in first
    assert "llm" in first

    b = taskgate.connect(URL, str(policies), prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    try:
        # traffic 1: three checks, one tenant spends 300 tokens
        for _ in range(3):
            assert b.check("api", "alice").allowed
        a = b.admit("llm", "acme", tokens=300)
        assert a.allowed
        screen = tmux.wait_for("3 allowed on api", lambda s: allowed(s, "api") == 3)
        assert allowed(screen, "llm") == 1

        # traffic 2: the counts move; alice is throttled; acme's budget shows as a bar
        for _ in range(5):
            b.check("api", "alice")
        b.check_many("api", ["bob", "carol"])
        a.settle(250)
        screen = tmux.wait_for("the counts moving", lambda s: allowed(s, "api") == 7)
        api = totals_row(screen, "api")
        assert api is not None
        assert api[:3] == [7, 3, 3]  # allowed, denied, of which by rate
        assert re.search(r"In flight", screen)
        assert re.search(r"llm\s+unified\s.*\b1/3\b", screen), screen  # a slot held of 3
        keys = screen.split("Top keys: api", 1)[1]
        assert re.search(r"^\s*alice\s+3\b", keys, re.M), screen
        bar = re.search(r"acme\s+0\s+300\s+([█░#-]{20}) 250/1,000", screen)
        assert bar, screen
        assert bar.group(1).count("█") + bar.group(1).count("#") == 5  # 25% of 20
        a.release()
        screen = tmux.wait_for(
            "the slot given back", lambda s: bool(re.search(r"llm\s+unified\s.*\b0/3\b", s))
        )
    finally:
        b.close()
