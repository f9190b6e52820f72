"""Hatchling build hook: generate taskgate's gRPC stubs and ship them in the wheel.

Runs ``generate()`` from ``scripts/gen_proto.py`` (the same code as
``python scripts/gen_proto.py``), which writes ``src/taskgate/_proto/`` from
``contract/throttlekit.proto``. The stubs are git-ignored build artifacts, so:

- a standard wheel (``pip install .``, ``python -m build``) force-includes them as
  ``taskgate/_proto/*``;
- an editable wheel (``pip install -e .``) adds nothing: it imports ``taskgate``
  straight from ``src/``, where the stubs have just been written.

Other targets (the sdist) are left alone: it ships the contract and this hook, and a
wheel built from it generates its own stubs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_GEN_PROTO = Path("scripts/gen_proto.py")


def _load_gen_proto(root: Path) -> ModuleType:
    path = root / _GEN_PROTO
    if not path.is_file():
        raise RuntimeError(f"taskgate build: {path} is missing; it generates the gRPC stubs")
    spec = importlib.util.spec_from_file_location("_taskgate_gen_proto", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"taskgate build: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        gen_proto = _load_gen_proto(root)
        try:
            written: list[Path] = gen_proto.generate(root)
        except gen_proto.ProtoGenerationError as exc:
            raise RuntimeError(f"taskgate build: cannot generate the gRPC stubs: {exc}") from exc
        self.app.display_info(f"taskgate: generated {len(written)} files in {gen_proto.OUT_DIR}")
        if version == "editable":
            return
        src = root.resolve() / "src"
        for path in written:
            build_data["force_include"][str(path)] = path.relative_to(src).as_posix()

    def clean(self, versions: list[str]) -> None:
        if self.target_name == "wheel":
            _load_gen_proto(Path(self.root)).clean(Path(self.root))
