"""The vendored ThrottleKit contract (contract/VENDORED.json) and our wire's compatibility with it.

- every vendored file still has the sha256 its manifest records (a drifted or hand-edited copy fails);
- the installed reference, throttlekit-py, still ships the descriptor we vendored;
- our ``contract/throttlekit.proto`` (as generated into ``taskgate._proto``) declares every upstream message
  it shares with ThrottleKit with the same field names, numbers, types and labels, and every upstream RPC of
  the services it declares with the same request and response types.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import ROOT, THROTTLEKIT_PY_VERSION, VECTORS

CONTRACT = ROOT / "contract"
MANIFEST: dict[str, Any] = json.loads((CONTRACT / "VENDORED.json").read_text(encoding="utf-8"))
FILES = {f["path"]: f for f in MANIFEST["files"]}
DESCRIPTOR = CONTRACT / "throttlekit-py.descriptor.binpb"

# Upstream declarations taskgate does not declare (none since it serves Fleet). Adding one here exempts it.
NOT_DECLARED: set[str] = set()


def load_upstream() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(DESCRIPTOR.read_bytes())


def load_ours() -> descriptor_pb2.FileDescriptorProto:
    from taskgate._proto import throttlekit_pb2

    fd = descriptor_pb2.FileDescriptorProto()
    throttlekit_pb2.DESCRIPTOR.CopyToProto(fd)
    return fd


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", sorted(FILES))
def test_vendored_file_matches_its_sha256(name: str) -> None:
    entry = FILES[name]
    assert entry["source"], f"{name}: the manifest names no source"
    assert entry["version"], f"{name}: the manifest names no version"
    assert sha256(CONTRACT / name) == entry["sha256"], (
        f"contract/{name} drifted from contract/VENDORED.json: re-vendor with scripts/vendor_throttlekit.py"
    )


def test_every_vendored_file_is_in_the_manifest() -> None:
    ours = {"throttlekit.proto", "VENDORED.json"}
    on_disk = {p.name for p in CONTRACT.iterdir() if p.is_file()} - ours
    assert on_disk == set(FILES)


def test_vectors_are_read_from_the_vendored_copy() -> None:
    assert VECTORS == CONTRACT / "golden-vectors.json"
    data = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert data["contractVersion"] == "1"
    assert data["decisionFields"] == ["allowed", "limit", "remaining", "resetAt", "retryAfterMs"]
    assert FILES["golden-vectors.json"]["version"].startswith(data["generatedFrom"])


def test_no_test_reads_outside_the_checkout() -> None:
    needles = ('"shared" / "throttlekit"', "shared/throttlekit", "ROOT.parent")
    mine = Path(__file__).name
    hits = [
        p.name
        for p in (ROOT / "tests").rglob("*.py")
        if p.name != mine and any(n in p.read_text(encoding="utf-8") for n in needles)
    ]
    assert hits == []


def test_installed_reference_ships_the_vendored_descriptor(throttlekit_py: Path) -> None:
    import importlib.util
    import sys

    entry = FILES[DESCRIPTOR.name]
    assert entry["version"] == f"throttlekit-py {THROTTLEKIT_PY_VERSION}"
    pb2 = throttlekit_py / "_generated" / "throttlekit_pb2.py"
    assert sha256(pb2) == entry["origin"]["member_sha256"]
    spec = importlib.util.spec_from_file_location(
        "vendor_throttlekit", ROOT / "scripts" / "vendor_throttlekit.py"
    )
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)
    spec.loader.exec_module(mod)
    blob: bytes = mod.serialized_descriptor(pb2.read_text(encoding="utf-8"))
    assert blob == DESCRIPTOR.read_bytes()


def _fields(m: descriptor_pb2.DescriptorProto) -> dict[int, tuple[str, int, int, str]]:
    return {f.number: (f.name, f.type, f.label, f.type_name) for f in m.field}


def test_upstream_descriptor_is_throttlekit_v1() -> None:
    up = load_upstream()
    assert up.package == "throttlekit.v1"
    assert up.syntax == "proto3"
    assert {s.name for s in up.service} == {"RateLimiter", "Monitor", "Fleet"}


def test_shared_messages_have_upstream_fields() -> None:
    up, ours = load_upstream(), load_ours()
    assert ours.package == up.package
    our_msgs = {m.name: m for m in ours.message_type}
    checked = 0
    for m in up.message_type:
        if m.name in NOT_DECLARED:
            continue
        assert m.name in our_msgs, f"upstream message {m.name} is missing from contract/throttlekit.proto"
        mine = _fields(our_msgs[m.name])
        for number, want in _fields(m).items():
            assert mine.get(number) == want, (
                f"{m.name} field {number}: upstream {want}, ours {mine.get(number)}"
            )
        # our additions on an upstream message take numbers >= 16 (upstream reserves 6-15 on Decision)
        extra = set(mine) - set(_fields(m))
        assert all(n >= 16 for n in extra), f"{m.name}: taskgate fields below 16: {sorted(extra)}"
        up_reserved = {(r.start, r.end) for r in m.reserved_range}
        assert up_reserved <= {(r.start, r.end) for r in our_msgs[m.name].reserved_range}
        checked += 1
    assert checked == len([m for m in up.message_type if m.name not in NOT_DECLARED])
    assert checked > 25


def test_shared_services_have_upstream_rpcs() -> None:
    up, ours = load_upstream(), load_ours()
    our_svcs = {s.name: s for s in ours.service}
    for s in up.service:
        if s.name in NOT_DECLARED:
            continue
        assert s.name in our_svcs, f"upstream service {s.name} is missing"
        mine = {r.name: r for r in our_svcs[s.name].method}
        for r in s.method:
            assert r.name in mine, f"{s.name}.{r.name} is missing"
            got = mine[r.name]
            assert (got.input_type, got.output_type, got.client_streaming, got.server_streaming) == (
                r.input_type,
                r.output_type,
                r.client_streaming,
                r.server_streaming,
            ), f"{s.name}.{r.name} differs from upstream"


def test_shared_enums_have_upstream_values() -> None:
    up, ours = load_upstream(), load_ours()
    our_enums = {e.name: e for e in ours.enum_type}
    for e in up.enum_type:
        if e.name in NOT_DECLARED:
            continue
        want = {v.number: v.name for v in e.value}
        got = {v.number: v.name for v in our_enums[e.name].value}
        assert got == want, e.name


def test_undeclared_upstream_names_are_exactly_the_known_ones() -> None:
    up, ours = load_upstream(), load_ours()
    declared = (
        {m.name for m in ours.message_type}
        | {e.name for e in ours.enum_type}
        | {s.name for s in ours.service}
    )
    upstream = (
        {m.name for m in up.message_type} | {e.name for e in up.enum_type} | {s.name for s in up.service}
    )
    assert upstream - declared == NOT_DECLARED & upstream
