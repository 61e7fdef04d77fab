"""``__all__`` both ways: every name it lists exists, every public class or function a module defines is in it."""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil

import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def _modules() -> list[str]:
    names = []
    for pkg in ("agent", "agent.recommenders", "retrain_server", "retrain_server.sources"):
        mod = importlib.import_module(pkg)
        # private modules (the compiled ``_native``) are not public API
        names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)
                  if not m.ispkg and not m.name.startswith("_")]
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_dunder_all_is_exactly_the_public_api(name: str) -> None:
    module = importlib.import_module(name)
    listed = getattr(module, "__all__", None)
    assert listed is not None, f"{name} has no __all__"
    assert len(set(listed)) == len(listed), f"{name}.__all__ repeats a name"
    for public in listed:
        assert hasattr(module, public), f"{name}.__all__ lists missing {public}"
    defined = [k for k, v in vars(module).items()
               if not k.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
               and getattr(v, "__module__", None) == name]
    assert not [d for d in defined if d not in listed], f"{name} defines public names missing from __all__"
