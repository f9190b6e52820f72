"""Pure request building and reply decoding for the gRPC door, shared by ServiceBackend and its asyncio twin
(as :mod:`taskgate.engine.plan` is for the Redis door). No I/O, and no grpc import: only the messages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import yaml

from taskgate._proto import throttlekit_pb2 as pb
from taskgate.engine.plan import MAX_MANY
from taskgate.policy import Policies, parse_policy
from taskgate.types import AdmitReply, Decision, Forecast, HeartbeatReply, LeaseRef, ReserveReply, Settlement

__all__ = ["Call", "Calls", "check_int", "decode_decision", "decode_policies", "merge_heartbeats"]

T = TypeVar("T")
_NOW = "now= cannot travel over the gRPC door: the service decides with its store's clock (use a direct door)"


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One RPC: the method, the request, how to decode the reply, whether it may be retried, and how to answer
    from a fail-mode Decision when the service is unreachable (None: the call has no fail mode)."""

    method: str
    request: Any
    decode: Callable[[Any], T]
    policy: str = ""
    idempotent: bool = False
    fallback: Callable[[Decision], T] | None = None


def _no_now(now: int | None) -> None:
    if now is not None:
        raise ValueError(_NOW)


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    return value


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def decode_decision(m: Any) -> Decision:
    return Decision(m.allowed, m.limit, m.remaining, m.reset_at, m.retry_after_ms, m.booked, m.booking_token)


def _decision_of(r: Any) -> Decision:
    return decode_decision(r.decision)


def _same(d: Decision) -> Decision:
    return d


def decode_policies(r: Any) -> Policies:
    return Policies({i.name: parse_policy(i.name, yaml.safe_load(i.yaml)) for i in r.policies})


class Calls:
    """Turns public calls into :class:`Call` objects. Checks only what the wire cannot express (types, and
    ``cost``/``tokens`` >= 1 where the wire reads 0 as 1); the server validates the rest."""

    @staticmethod
    def check(policy: str, key: str, cost: int, now: int | None, book: bool, token: str) -> Call[Decision]:
        _no_now(now)
        req = pb.CheckRequest(
            policy=_text(policy, "policy"),
            key=_text(key, "key"),
            cost=check_int(cost, "cost", 1),
            book=bool(book),
            booking_token=_text(token, "token"),
        )
        return Call("Check", req, _decision_of, policy, fallback=_same)

    @staticmethod
    def check_many(policy: str, keys: Sequence[str], cost: int, now: int | None) -> Call[list[Decision]]:
        _no_now(now)
        if isinstance(keys, str) or not isinstance(keys, Sequence):
            raise ValueError(f"keys must be a sequence of strings, got {type(keys).__name__}")
        ks = [_text(k, "key") for k in keys]
        req = pb.CheckManyRequest(policy=_text(policy, "policy"), keys=ks, cost=check_int(cost, "cost", 1))

        def decode(r: Any) -> list[Decision]:
            return [decode_decision(d) for d in r.decisions]

        return Call("CheckMany", req, decode, policy, fallback=lambda d: [d] * len(ks))

    @staticmethod
    def peek(policy: str, key: str, now: int | None) -> Call[Decision]:
        _no_now(now)
        req = pb.PeekRequest(policy=_text(policy, "policy"), key=_text(key, "key"))
        return Call("Peek", req, _decision_of, policy, idempotent=True, fallback=_same)

    @staticmethod
    def forecast(policy: str, key: str, cost: int, now: int | None) -> Call[Forecast]:
        _no_now(now)
        req = pb.ForecastRequest(
            policy=_text(policy, "policy"), key=_text(key, "key"), cost=check_int(cost, "cost", 1)
        )

        def decode(r: Any) -> Forecast:
            f = r.forecast
            return Forecast(f.spendable_now, f.next_replenish_at, f.full_at)

        return Call("Forecast", req, decode, policy, idempotent=True)

    @staticmethod
    def debit(policy: str, key: str, tokens: int, now: int | None) -> Call[Decision]:
        _no_now(now)
        req = pb.DebitRequest(
            policy=_text(policy, "policy"), key=_text(key, "key"), tokens=check_int(tokens, "tokens", 1)
        )
        return Call("Debit", req, _decision_of, policy, fallback=_same)

    @staticmethod
    def admit(
        policy: str,
        key: str,
        cost: int,
        tokens: int,
        now: int | None,
        holder: str | None,
        book: bool,
        token: str,
    ) -> Call[AdmitReply]:
        _no_now(now)
        req = pb.AdmitRequest(
            policy=_text(policy, "policy"),
            key=_text(key, "key"),
            cost=check_int(cost, "cost", 1),
            tokens=check_int(tokens, "tokens", 0),
            book=bool(book),
            booking_token=_text(token, "booking_token"),
            holder="" if holder is None else _text(holder, "holder"),
        )

        def decode(r: Any) -> AdmitReply:
            lease = LeaseRef(r.lease_id, policy, key, "") if r.lease_id else None
            return AdmitReply(
                decode_decision(r.decision),
                r.binding_axis,
                lease,
                r.lease_expires_at,
                r.reservation_id,
                r.reserved_tokens,
            )

        return Call("Admit", req, decode, policy, fallback=lambda d: AdmitReply(d, "", None, 0, "", 0))

    @staticmethod
    def release(lease_id: str, dropped: bool, now: int | None) -> Call[bool]:
        _no_now(now)
        req = pb.ReleaseRequest(lease_id=_text(lease_id, "lease_id"), dropped=bool(dropped))
        return Call("Release", req, lambda r: bool(r.released), idempotent=True)

    @staticmethod
    def heartbeat(lease_ids: Sequence[str], now: int | None) -> list[Call[HeartbeatReply]]:
        _no_now(now)
        if isinstance(lease_ids, str) or not isinstance(lease_ids, Sequence):
            raise ValueError(f"lease_ids must be a sequence of strings, got {type(lease_ids).__name__}")
        ids = [_text(i, "lease id") for i in lease_ids]

        def decode(r: Any) -> HeartbeatReply:
            return HeartbeatReply(list(r.live_ids), list(r.reclaimed_ids), r.next_deadline)

        chunks = [ids[i : i + MAX_MANY] for i in range(0, len(ids), MAX_MANY)]
        return [Call("Heartbeat", pb.HeartbeatRequest(lease_ids=c), decode, idempotent=True) for c in chunks]

    @staticmethod
    def reserve(policy: str, key: str, tokens: int, now: int | None) -> Call[ReserveReply]:
        _no_now(now)
        req = pb.ReserveTokensRequest(
            policy=_text(policy, "policy"), key=_text(key, "key"), tokens=check_int(tokens, "tokens")
        )

        def decode(r: Any) -> ReserveReply:
            return ReserveReply(decode_decision(r.decision), r.reservation_id, r.expires_at)

        return Call("Reserve", req, decode, policy)

    @staticmethod
    def settle(policy: str, key: str, reservation_id: str, actual: int, now: int | None) -> Call[Settlement]:
        _no_now(now)
        req = pb.SettleRequest(
            policy=_text(policy, "policy"),
            key=_text(key, "key"),
            reservation_id=_text(reservation_id, "reservation_id"),
            actual=check_int(actual, "actual"),
        )

        def decode(r: Any) -> Settlement:
            return Settlement(decode_decision(r.decision), r.charged, r.refunded)

        return Call("Settle", req, decode, policy)

    @staticmethod
    def reset(policy: str, key: str) -> Call[None]:
        req = pb.ResetRequest(policy=_text(policy, "policy"), key=_text(key, "key"))
        return Call("Reset", req, lambda r: None, policy)

    @staticmethod
    def list_policies() -> Call[Policies]:
        return Call("ListPolicies", pb.ListPoliciesRequest(), decode_policies, idempotent=True)


def merge_heartbeats(replies: list[HeartbeatReply]) -> HeartbeatReply:
    if len(replies) == 1:
        return replies[0]
    return HeartbeatReply(
        [x for r in replies for x in r.live],
        [x for r in replies for x in r.reclaimed],
        min((r.next_deadline for r in replies), default=0),
    )
