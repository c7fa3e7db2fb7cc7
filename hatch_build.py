"""Hatchling build hook: compile ``otel_ctxbridge/_speedups.c`` when a C compiler is there.

The extension is optional. Without a compiler, on an interpreter other than CPython, or with
``OTEL_CTXBRIDGE_NO_EXTENSIONS`` set (to any non-empty value), the build makes a pure-Python
wheel that behaves the same, only slower on scope entry (a failed compilation says so in a
warning, which pip shows with ``-v``). With
``OTEL_CTXBRIDGE_REQUIRE_EXTENSIONS=1`` a failed compilation fails the build instead (CI sets
it). Editable installs (``pip install -e .``) build the module in place, next to
``_speedups.c``, and remove an earlier in-place build when they do not build one.
"""

from __future__ import annotations

import os
import platform
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MODULE = "otel_ctxbridge._speedups"
SOURCE = "otel_ctxbridge/_speedups.c"


class SpeedupsBuildHook(BuildHookInterface):  # type: ignore[type-arg] # hatchling's generic
    """Compile the optional C accelerator into the wheel (or in place, for editables)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Compile; on success mark the wheel as platform-specific."""
        if self.target_name != "wheel":
            return
        editable = version == "editable"
        if editable:  # never leave a build of older sources where Python would import it
            suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
            try:
                (Path(self.root) / "otel_ctxbridge" / f"_speedups{suffix}").unlink(missing_ok=True)
            except OSError as exc:  # loaded by a running process (Windows): rebuilt over below
                self.app.display_warning(f"otel_ctxbridge: could not remove the old build: {exc}")
        if os.environ.get("OTEL_CTXBRIDGE_NO_EXTENSIONS"):
            self.app.display_info("otel_ctxbridge: OTEL_CTXBRIDGE_NO_EXTENSIONS set, pure Python")
            return
        if platform.python_implementation() != "CPython":
            self.app.display_info("otel_ctxbridge: not CPython, pure Python")
            return
        self._work = Path(tempfile.mkdtemp(prefix="otel_ctxbridge-build-"))
        try:
            built = self._compile(inplace=editable)
        except Exception as exc:  # any build failure falls back to pure Python
            if os.environ.get("OTEL_CTXBRIDGE_REQUIRE_EXTENSIONS"):
                shutil.rmtree(self._work, ignore_errors=True)
                raise
            self.app.display_warning(
                f"otel_ctxbridge: the C accelerator was not built ({exc}); "
                "installing the pure-Python version"
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if not editable:
            build_data["force_include"][str(built)] = f"otel_ctxbridge/{built.name}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        """Remove the compiler's work directory once the wheel holds what it built."""
        work = getattr(self, "_work", None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)

    def _compile(self, *, inplace: bool) -> Path:
        # setuptools knows every platform's compiler and flags; it is only a build dependency.
        from setuptools import Distribution, Extension  # noqa: PLC0415
        from setuptools.command.build_ext import build_ext  # noqa: PLC0415

        root = Path(self.root)
        dist = Distribution(
            {"name": "otel_ctxbridge", "ext_modules": [Extension(MODULE, [SOURCE])]}
        )
        dist.src_root = str(root)  # type: ignore[attr-defined] # distutils' own attribute
        command = build_ext(dist)
        command.inplace = inplace
        command.build_lib = str(self._work / "lib")
        command.build_temp = str(self._work / "temp")
        command.ensure_finalized()
        cwd = Path.cwd()
        os.chdir(root)  # build_ext resolves sources and in-place targets from the cwd
        try:
            command.run()
            target = Path(command.get_ext_fullpath(MODULE))
        finally:
            os.chdir(cwd)
        return target if target.is_absolute() else root / target
