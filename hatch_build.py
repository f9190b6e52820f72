"""Hatchling build hook: generate taskgate's build artifacts and ship them in the wheel.

- ``generate()`` from ``scripts/gen_proto.py`` (the same code as ``python scripts/gen_proto.py``) writes the
  gRPC stubs, ``src/taskgate/_proto/``, from ``contract/throttlekit.proto``;
- ``generate()`` from ``scripts/unasync.py`` (the same code as ``python scripts/unasync.py``) writes the sync
  doors and admission objects, ``src/taskgate/backends/_sync/``, from their asyncio sources.

Both are git-ignored build artifacts, so:

- a standard wheel (``pip install .``, ``python -m build``) force-includes them as
  ``taskgate/_proto/*`` and ``taskgate/backends/_sync/*``;
- an editable wheel (``pip install -e .``) adds nothing: it imports ``taskgate``
  straight from ``src/``, where they have just been written.

Other targets (the sdist) are left alone: it ships the contract, the sources, the scripts and this hook, and
a wheel built from it generates its own.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

_GEN_PROTO = Path("scripts/gen_proto.py")
_UNASYNC = Path("scripts/unasync.py")
# (script, what it writes, the exception class it raises for a source it cannot generate from)
_GENERATORS = (
    (_GEN_PROTO, "the gRPC stubs", "ProtoGenerationError"),
    (_UNASYNC, "the sync doors", "UnasyncError"),
)


def _load(root: Path, script: Path) -> ModuleType:
    path = root / script
    if not path.is_file():
        raise RuntimeError(f"taskgate build: {path} is missing; it generates a part of the package")
    spec = importlib.util.spec_from_file_location(f"_taskgate_{path.stem}", path)
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
        written: list[Path] = []
        for script, what, error in _GENERATORS:
            gen = _load(root, script)
            try:
                files: list[Path] = gen.generate(root)
            except getattr(gen, error) as exc:
                raise RuntimeError(f"taskgate build: cannot generate {what}: {exc}") from exc
            self.app.display_info(f"taskgate: generated {len(files)} files in {gen.OUT_DIR}")
            written += files
        if version == "editable":
            return
        src = root.resolve() / "src"
        for path in written:
            build_data["force_include"][str(path)] = path.resolve().relative_to(src).as_posix()

    def clean(self, versions: list[str]) -> None:
        if self.target_name == "wheel":
            for script, _, _ in _GENERATORS:
                _load(Path(self.root), script).clean(Path(self.root))
