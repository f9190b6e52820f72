"""The provider's 429 on RQ, on real ``rq worker`` processes (forking horses, RQ's own scheduler): a job whose
call met a 429 is deferred until the fleet-wide hold ends (through RQ's scheduler, or parked again in the
waiting room), not failed; its RQ retries are untouched; past ``provider.maxDeferrals`` it fails with a
ThrottledError naming them. CI-sized against the mock provider (``bench/mock_provider.py``); the jobs are in
``tests/apps/rq_provider_jobs.py``. Judged by counts (one 200 per job, every job finished once), and by the
mock's log: no call admitted after a hold was written reached it before the hold's end."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator

import pytest
from rq.job import JobStatus

from bench.mock_provider import MockProvider
from tests.apps import rq_provider_jobs as jobs
from tests.test_rq_workers import Fleet, fleets

pytestmark = pytest.mark.slow
N = 40
RPM = 600  # 10 a second, in buckets of 2 s (20)


class ProviderFleet(Fleet):
    worker = "tests.apps.rq_provider_jobs.Worker"


@pytest.fixture
def mock() -> Iterator[MockProvider]:
    m = MockProvider(rpm=RPM, tpm=10_000_000)
    yield m
    m.close()


@pytest.fixture
def fleet() -> Iterator[Callable[..., ProviderFleet]]:
    yield from fleets(ProviderFleet)


@pytest.mark.parametrize("where", ["scheduler", "room"])
def test_a_429_defers_the_job_until_the_hold_ends(
    fleet: Callable[..., ProviderFleet], mock: MockProvider, where: str
) -> None:
    url = mock.serve()
    f = fleet(2, TG_PROVIDER=url)
    mock.spend(RPM / 60 * 3)  # someone else spent the bucket and 1 s more: the first calls get 429s
    body = jobs.call_room if where == "room" else jobs.call
    batch = [f.enqueue(body, i) for i in range(N)]
    deadline = time.monotonic() + 90
    while f.r.llen(f"{f.prefix}:ok") < N:
        assert time.monotonic() < deadline, f"only {f.r.llen(f'{f.prefix}:ok')}/{N} done"
        time.sleep(0.1)
    time.sleep(0.5)  # anything run twice would show by now
    oks = collections.Counter(c.call for c in mock.calls if c.status == 200)
    n429 = sum(c.status == 429 for c in mock.calls)
    assert sorted(oks) == sorted(str(i) for i in range(N))
    assert set(oks.values()) == {1}
    assert n429 >= 1, "the spending was meant to give 429s"
    refused = {c.call for c in mock.calls if c.status == 429}
    deferred = 0
    for i, job in enumerate(batch):
        job.refresh()  # type: ignore[no-untyped-call]
        assert job.get_status() == JobStatus.FINISHED
        assert not job.number_of_retries
        assert job.retries_left is None
        provider = int((job.meta.get("taskgate_state") or {}).get("provider", 0))
        assert (provider > 0) == (str(i) in refused)
        deferred += provider > 0
    violations, during = mock.early_calls()
    print(
        f"{where}: {n429} 429s, {deferred} jobs deferred by the provider, {during} calls in flight in a hold"
    )
    assert violations == 0


def test_provider_deferrals_are_capped_with_a_clear_error(
    fleet: Callable[..., ProviderFleet],
) -> None:
    f = fleet(1)
    job = f.enqueue(jobs.always_429, 0)
    deadline = time.monotonic() + 60
    while job.get_status(refresh=True) != JobStatus.FAILED:
        assert time.monotonic() < deadline, f"status {job.get_status()}"
        time.sleep(0.1)
    assert f.r.llen(f"{f.prefix}:tries") == 2  # the first try, one provider deferral (maxDeferrals 1)
    result = job.latest_result()
    assert result is not None
    assert result.exc_string is not None
    assert "refused by the provider (429) 2 times" in result.exc_string
    assert "provider.maxDeferrals=1 reached" in result.exc_string
