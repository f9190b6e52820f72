"""Vendor ThrottleKit's contract into ``contract/`` and record it in ``contract/VENDORED.json``.

Usage, from a source checkout::

    pip download --no-deps throttlekit-py==0.5.1 -d /tmp/tk
    python scripts/vendor_throttlekit.py --wheel /tmp/tk/throttlekit_py-0.5.1-py3-none-any.whl \\
        --vectors PATH/TO/golden-vectors.json

Two files are vendored, each with its source, version and sha256 in the manifest:

- ``contract/golden-vectors.json``: ThrottleKit's conformance data, copied byte for byte.
- ``contract/throttlekit-py.descriptor.binpb``: the serialized ``FileDescriptorProto`` of ThrottleKit's
  ``throttlekit.proto`` as the throttlekit-py wheel ships it (the wheel has no ``.proto``, only the generated
  ``throttlekit/_generated/throttlekit_pb2.py``; the bytes passed to ``AddSerializedFile`` there are taken
  with :mod:`ast`, nothing of the wheel is imported or executed). Data only: no upstream code is committed.

``tests/test_contract.py`` fails when a vendored file no longer matches its recorded sha256, and, with
throttlekit-py installed, when the installed package's descriptor differs from the vendored one.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "contract"
MANIFEST = CONTRACT / "VENDORED.json"
VECTORS_NAME = "golden-vectors.json"
DESCRIPTOR_NAME = "throttlekit-py.descriptor.binpb"
PB2_IN_WHEEL = "throttlekit/_generated/throttlekit_pb2.py"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serialized_descriptor(pb2_source: str) -> bytes:
    """The bytes a protoc-generated ``*_pb2.py`` passes to ``AddSerializedFile`` (read, never executed)."""
    for node in ast.walk(ast.parse(pb2_source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return node.args[0].value
    raise ValueError("no AddSerializedFile(b'...') call in the generated module")


def _wheel_version(name: str) -> str:
    m = re.match(r"throttlekit_py-([^-]+)-", Path(name).name)
    if m is None:
        raise ValueError(f"{name} is not a throttlekit-py wheel")
    return m.group(1)


def vendor(wheel: Path, vectors: Path) -> dict[str, Any]:
    version = _wheel_version(wheel.name)
    wheel_bytes = wheel.read_bytes()
    with zipfile.ZipFile(wheel) as z:
        pb2 = z.read(PB2_IN_WHEEL)
    blob = serialized_descriptor(pb2.decode("utf-8"))
    (CONTRACT / DESCRIPTOR_NAME).write_bytes(blob)
    vec_bytes = vectors.read_bytes()
    meta = json.loads(vec_bytes)
    (CONTRACT / VECTORS_NAME).write_bytes(vec_bytes)
    manifest: dict[str, Any] = {
        "about": "Files under contract/ copied from ThrottleKit. tests/test_contract.py checks every sha256.",
        "files": [
            {
                "path": VECTORS_NAME,
                "sha256": sha256(vec_bytes),
                "source": "ThrottleKit core conformance vectors (golden-vectors.json), handed over with "
                "ThrottleKit's wire facts",
                "version": f"{meta['generatedFrom']}, contractVersion {meta['contractVersion']}",
            },
            {
                "path": DESCRIPTOR_NAME,
                "sha256": sha256(blob),
                "source": f"PyPI throttlekit-py {version}: the serialized FileDescriptorProto "
                f"in {PB2_IN_WHEEL}",
                "version": f"throttlekit-py {version}",
                "license": "MIT (the wheel's LICENSE: Copyright (c) 2026 Ameya Borkar)",
                "origin": {
                    "wheel": wheel.name,
                    "wheel_sha256": sha256(wheel_bytes),
                    "member": PB2_IN_WHEEL,
                    "member_sha256": sha256(pb2),
                },
            },
        ],
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, required=True, help="a downloaded throttlekit-py wheel")
    ap.add_argument("--vectors", type=Path, required=True, help="ThrottleKit's golden-vectors.json")
    args = ap.parse_args()
    for f in vendor(args.wheel, args.vectors)["files"]:
        print(f"{f['path']}  {f['sha256']}  ({f['version']})")


if __name__ == "__main__":
    main()
