"""The package's public surface: an explicit, sorted ``__all__`` that lists every public name."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import otel_ctxbridge as cb


def test_all_is_sorted_and_unique() -> None:
    """``__all__`` is kept sorted (ruff's RUF022 order) with no duplicates."""
    assert len(set(cb.__all__)) == len(cb.__all__)
    constants = [n for n in cb.__all__ if n.isupper()]
    others = [n for n in cb.__all__ if not n.isupper()]
    assert cb.__all__ == sorted(constants) + sorted(others, key=lambda n: (n[0].islower(), n))


def test_every_public_name_is_listed_in_all() -> None:
    """A public attribute added to the package without being put in ``__all__`` fails here."""
    public = {
        name
        for name, value in vars(cb).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public == set(cb.__all__)


def test_every_name_in_all_is_importable_and_documented() -> None:
    """Each exported name exists and carries a docstring (classes and functions)."""
    for name in cb.__all__:
        value = getattr(cb, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"


def test_design_contract_names_are_present() -> None:
    """The public names of DESIGN.md's store API stay as they are."""
    for name in ("ContextBridge", "Field", "AsyncLocalStorage", "MissingContextError"):
        assert name in cb.__all__
    for method in ("scope", "get", "current", "require", "update", "run", "bind", "inject"):
        assert callable(getattr(cb.ContextBridge, method))
    assert callable(cb.ContextBridge.extract)
    assert callable(cb.ContextBridge.storage)
    for method in ("run", "get_store", "enter_with", "exit", "disable", "bind", "snapshot"):
        assert callable(getattr(cb.AsyncLocalStorage, method))


def test_every_submodule_imports() -> None:
    """No module of the package fails to import (optional extras are installed in dev)."""
    for info in pkgutil.walk_packages(cb.__path__, prefix="otel_ctxbridge."):
        importlib.import_module(info.name)
