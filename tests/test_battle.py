"""The battle test's short variant (``python -m integration.battle --short``) as a subprocess.

It starts its own store and private Redis servers, three ``taskgate serve``, four Celery workers (one app on
RabbitMQ) and two RQ workers, injects the faults and exits 0 only if every check holds. Needs RabbitMQ (CI
fails without it) and ``redis-server`` on PATH.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, require

pytestmark = pytest.mark.slow
TIMEOUT_S = 420  # the short variant takes about two minutes


@pytest.mark.timeout(TIMEOUT_S + 120)
def test_battle_short(amqp_url: str) -> None:
    require(
        shutil.which("redis-server") is not None,
        "redis-server",
        "install Redis (apt-get install redis-server)",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "integration.battle", "--short"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the battle then stops every process it started, by PID
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the battle did not finish within {TIMEOUT_S}s:\n{out[-6000:]}")
    assert proc.returncode == 0, out[-12000:]
