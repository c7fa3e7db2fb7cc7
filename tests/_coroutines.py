"""A coroutine object that is not a native one, for tests of code that must run any coroutine."""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any


class NonNativeCoroutine(Coroutine[Any, Any, Any]):
    """A coroutine that is not a native one (as Cython or mypyc make them)."""

    def __init__(self, inner: Coroutine[Any, Any, Any]) -> None:
        self._inner = inner

    def send(self, value: Any) -> Any:
        return self._inner.send(value)

    def throw(self, *args: Any) -> Any:
        return self._inner.throw(*args)

    def close(self) -> None:
        self._inner.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._inner.__await__()
