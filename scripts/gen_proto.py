"""Generate taskgate's gRPC stubs from ``contract/throttlekit.proto``.

Usage, from a source checkout::

    python scripts/gen_proto.py

This writes ``src/taskgate/_proto/``: ``__init__.py``, ``throttlekit_pb2.py`` and
``throttlekit_pb2_grpc.py`` (grpcio-tools), plus the typed stubs
``throttlekit_pb2.pyi`` and ``throttlekit_pb2_grpc.pyi`` when mypy-protobuf is
installed. The directory holds build artifacts only: it is git-ignored and
rewritten on every run. The grpc module's import of ``throttlekit_pb2`` is made
package-relative, so the stubs work as ``taskgate._proto``.

``hatch_build.py`` imports :func:`generate` from this file, so ``pip install .``,
``pip install -e .`` and this script all run the same code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import sys
import sysconfig
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("contract/throttlekit.proto")
OUT_DIR = Path("src/taskgate/_proto")

_INIT_TEXT = '''"""Generated gRPC stubs for ``throttlekit.v1`` (see ``contract/throttlekit.proto``).

Build artifacts: do not edit. Regenerate with ``python scripts/gen_proto.py``.
"""
'''

# mypy-protobuf's protoc plugins: executable name -> function in mypy_protobuf.main.
_MYPY_PLUGINS = {"protoc-gen-mypy": "main", "protoc-gen-mypy_grpc": "grpc"}


class ProtoGenerationError(RuntimeError):
    """The stubs could not be generated; the message says why and what to do."""


def generated_names(proto: Path = PROTO) -> tuple[str, ...]:
    """Every file name :func:`generate` may write into the output directory."""
    stem = proto.stem
    return (
        "__init__.py",
        f"{stem}_pb2.py",
        f"{stem}_pb2_grpc.py",
        f"{stem}_pb2.pyi",
        f"{stem}_pb2_grpc.pyi",
    )


def generate(root: Path = ROOT, out_dir: Path | None = None, *, typed: bool = True) -> list[Path]:
    """Generate the stubs for ``root/contract/throttlekit.proto``; return the files written.

    ``out_dir`` defaults to ``root/src/taskgate/_proto``. With ``typed`` (the default) the
    ``.pyi`` stubs are generated too if mypy-protobuf is importable; otherwise they are
    skipped quietly. Generated files that this run did not produce (stale ``.pyi``) are
    removed. Raises :class:`ProtoGenerationError` on failure.
    """
    root = Path(root).resolve()
    proto = root / PROTO
    out = Path(out_dir) if out_dir is not None else root / OUT_DIR
    if not proto.is_file():
        raise ProtoGenerationError(f"proto contract not found: {proto}")
    try:
        protoc = importlib.import_module("grpc_tools.protoc")
    except ImportError as exc:
        raise ProtoGenerationError(
            "grpcio-tools is required to generate the gRPC stubs: pip install grpcio-tools"
        ) from exc
    well_known_types = str(resources.files("grpc_tools") / "_proto")
    want_pyi = typed and importlib.util.find_spec("mypy_protobuf") is not None

    with tempfile.TemporaryDirectory(prefix="taskgate-proto-") as tmp_name:
        tmp = Path(tmp_name)
        gen = tmp / "out"
        gen.mkdir()
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto.parent}",
            f"--proto_path={well_known_types}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
        ]
        if want_pyi:
            for name in _MYPY_PLUGINS:
                plugin = _find_plugin(name, tmp)
                if plugin is None:  # mypy-protobuf importable but its plugin is not runnable
                    print(f"gen_proto: {name} not found; skipping .pyi stubs", file=sys.stderr)
                    want_pyi = False
                    break
                args.append(f"--plugin={name}={plugin}")
        if want_pyi:
            args += [f"--mypy_out=quiet:{gen}", f"--mypy_grpc_out=quiet:{gen}"]
        args.append(str(proto))

        status = protoc.main(args)
        if status != 0:
            raise ProtoGenerationError(f"protoc failed with exit status {status} on {proto}")

        pb2 = f"{proto.stem}_pb2"
        _make_relative(gen / f"{pb2}_grpc.py", pb2, required=True)
        if want_pyi:
            _make_relative(gen / f"{pb2}_grpc.pyi", pb2, required=False)
        (gen / "__init__.py").write_text(_INIT_TEXT, encoding="utf-8")

        produced = sorted(p.name for p in gen.iterdir())
        missing = {"__init__.py", f"{pb2}.py", f"{pb2}_grpc.py"} - set(produced)
        if want_pyi:
            missing |= {f"{pb2}.pyi", f"{pb2}_grpc.pyi"} - set(produced)
        if missing:
            raise ProtoGenerationError(f"protoc did not produce {sorted(missing)}")

        out.mkdir(parents=True, exist_ok=True)
        for stale in set(generated_names(proto)) - set(produced):
            (out / stale).unlink(missing_ok=True)
        written: list[Path] = []
        for name in produced:
            target = out / name
            staged = out / f".{name}.tmp"
            shutil.copyfile(gen / name, staged)
            os.replace(staged, target)
            written.append(target)
    return written


def clean(root: Path = ROOT, out_dir: Path | None = None) -> None:
    """Remove the generated files (only those :func:`generate` writes)."""
    out = Path(out_dir) if out_dir is not None else Path(root) / OUT_DIR
    for name in generated_names():
        (out / name).unlink(missing_ok=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _make_relative(path: Path, module: str, *, required: bool) -> None:
    """Rewrite absolute imports of ``module`` in ``path`` as package-relative ones."""
    text = path.read_text(encoding="utf-8")
    name = re.escape(module)
    text, n_import = re.subn(
        rf"^import {name}(\s+as\s+\w+)?[ \t]*$", rf"from . import {module}\1", text, flags=re.M
    )
    text, n_from = re.subn(rf"^from {name} import ", f"from .{module} import ", text, flags=re.M)
    if required and n_import + n_from == 0:
        raise ProtoGenerationError(f"no import of {module} found to rewrite in {path.name}")
    if re.search(rf"^\s*(import|from) {name}\b", text, flags=re.M):
        raise ProtoGenerationError(f"an absolute import of {module} is left in {path.name}")
    path.write_text(text, encoding="utf-8")


def _find_plugin(name: str, tmp: Path) -> Path | None:
    """Locate mypy-protobuf's protoc plugin ``name``.

    Looks beside the running interpreter, in its scripts directory, then on PATH (pip's
    isolated build environment puts its scripts there). Failing that, on POSIX, writes a
    shim into ``tmp`` that runs the plugin with this interpreter.
    """
    dirs = [str(Path(sys.executable).parent), sysconfig.get_path("scripts")]
    found = shutil.which(name, path=os.pathsep.join([*dirs, os.environ.get("PATH", "")]))
    if found is not None:
        return Path(found)
    if os.name == "nt":
        return None
    func = _MYPY_PLUGINS[name]
    shim = tmp / name
    code = f"import sys; from mypy_protobuf.main import {func}; sys.exit({func}())"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)}\n")
    shim.chmod(0o755)
    return shim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Generate src/taskgate/_proto/ from contract/throttlekit.proto."
    )
    parser.parse_args(argv)
    try:
        written = generate()
    except ProtoGenerationError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
