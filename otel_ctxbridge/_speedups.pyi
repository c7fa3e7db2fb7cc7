"""Types of the optional compiled accelerator (``_speedups.c``); see ``_accel.py``."""

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, final

from opentelemetry.context import Context

API: int

class State:
    local: Mapping[str, object]
    frame: Any
    generation: int
    def __init__(self, local: Mapping[str, object], frame: Any, generation: int) -> None: ...

@final
class ScopeState(dict[str, object]):
    local: Mapping[str, object]
    frame: Any
    generation: int
    def __call__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class ScopeCore:
    _bridge: Any
    _values: Mapping[str, Any] | None
    _token: Token[Context] | None
    def __init__(self, bridge: Any, values: Mapping[str, Any]) -> None: ...
    def __enter__(self) -> ScopeCore: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class ScopeMaker:
    def __init__(self, bridge: Any, scope_type: type[ScopeCore], original: Any = None) -> None: ...
    def __call__(self, **values: Any) -> ScopeCore: ...

class FieldGetter:
    def __init__(
        self,
        bridge: Any,
        attributes: dict[str, Any],
        missing: object,
        fallback: Callable[..., Any],
        original: Any = None,
    ) -> None: ...
    def __call__(self, name: str, default: Any = None) -> Any: ...

def derive(
    key: str, plans: Mapping[str, Any], ctx: Context, values: Mapping[str, Any], frame: Any
) -> Context | None: ...
def uuid4_texts(raw: bytes) -> list[str]: ...
def collect_headers(headers: Any, wanted: frozenset[bytes]) -> Any: ...
def trace_headers(
    headers: Any, others: frozenset[bytes]
) -> tuple[Sequence[bytes], Sequence[bytes]] | None: ...
def traceparent_ready(value: bytes) -> bool: ...
def response_started(exchange: Any, message: Any) -> Any: ...
def stamp_plain(span: Any, plain: dict[str, str], values: dict[str, Any]) -> Any: ...
def request_id_ready(raw: bytes, max_length: int) -> str | None: ...
def append_header(message: Any, name: bytes, value: bytes) -> bool | None: ...
def write_span(
    span: Any,
    attributes: dict[str, Any],
    overwrite: bool,
    expected: str | None,
    name: str | None,
    renamed: dict[str, Any] | None,
) -> bool: ...
def configure(
    *,
    var: ContextVar[Context],
    context_type: type[Context],
    baggage_key: str,
    span_key: str,
    derive: Callable[..., Context],
    stamp: Callable[..., None],
    detach_failed: Callable[[], None],
    child_state: Callable[..., Any],
    empty: Mapping[str, Any],
    may_exceed_limits: Callable[[Mapping[str, object]], bool],
    member_limit: int,
    scope_signature: Any,
    get_signature: Any,
    bounded_type: type,
    span_type: type,
    lock_type: type,
) -> None: ...
