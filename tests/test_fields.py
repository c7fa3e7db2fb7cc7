"""Field declarations: defaults, resolution by the bridge, and configuration errors."""

from __future__ import annotations

import os
import re
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

import otel_ctxbridge as cb


def test_defaults_resolve_from_name_and_prefix() -> None:
    """Baggage key and log key default to the name; the attribute to prefix + name."""
    bridge = cb.ContextBridge([cb.Field("tenant_id")], attribute_prefix="acme.")
    field = bridge.fields["tenant_id"]
    assert field.baggage_key == "tenant_id"
    assert field.log_key == "tenant_id"
    assert field.attribute == "acme.tenant_id"
    assert field.propagate is True
    assert field.inbound == "trusted"  # secure default: nothing from clients until trusted


def test_explicit_names_are_kept() -> None:
    """Explicit baggage key, attribute and log key win over the defaults."""
    bridge = cb.ContextBridge(
        [cb.Field("rid", baggage_key="request.id", attribute="http.rid", log_key="reqid")]
    )
    field = bridge.fields["rid"]
    assert (field.baggage_key, field.attribute, field.log_key) == (
        "request.id",
        "http.rid",
        "reqid",
    )


def test_header_names_are_lowercased() -> None:
    """Header names are matched case-insensitively, stored lowercase."""
    assert cb.Field("request_id", header="X-Request-ID").header == "x-request-id"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "1bad"}, "name"),
        ({"name": "ok", "inbound": "sometimes"}, "inbound"),
        ({"name": "ok", "baggage_key": "has space"}, "baggage_key"),
        ({"name": "ok", "header": "bad header"}, "header"),
        ({"name": "ok", "max_length": 0}, "max_length"),
        ({"name": "ok", "max_length": 5000}, "max_length"),
        ({"name": "ok", "validator": "(unclosed"}, "regular expression"),
        ({"name": "ok", "validator": 42}, "validator"),
        ({"name": "ok", "redact": "shout"}, "redact"),
        ({"name": "ok", "generate": "not callable"}, "generate"),
        ({"name": "ok", "propagate": "no"}, "propagate"),
        ({"name": "ok", "baggage_key": 5}, "baggage_key"),
        ({"name": "ok", "attribute": ""}, "attribute"),
        ({"name": "ok", "attribute": "app.x\n"}, "attribute"),
        ({"name": "ok", "log_key": "a b"}, "log_key"),
        ({"name": "ok", "log_key": "x'); import os; ('"}, "log_key"),
        ({"name": "ok", "log_key": "ﬁeld"}, "log_key"),
        ({"name": "ok", "log_key": 5}, "log_key"),
        ({"name": "ok", "max_length": True}, "max_length"),
    ],
)
def test_bad_configuration_raises_naming_the_field(kwargs: dict[str, object], message: str) -> None:
    """Each configuration mistake raises FieldConfigError naming the field and the problem."""
    with pytest.raises(cb.FieldConfigError, match=message) as info:
        cb.Field(**kwargs)  # type: ignore[arg-type]
    assert repr(kwargs["name"]) in str(info.value)


def test_duplicate_names_keys_and_headers_raise() -> None:
    """Two fields may not share a name, baggage key, attribute, log key or header."""
    with pytest.raises(cb.FieldConfigError, match=r"'b'.*'a'"):
        cb.ContextBridge([cb.Field("a", header="x-a"), cb.Field("b", header="x-a")])
    with pytest.raises(cb.FieldConfigError, match="baggage key"):
        cb.ContextBridge([cb.Field("a"), cb.Field("b", baggage_key="a")])
    with pytest.raises(cb.FieldConfigError, match="'a' is declared twice"):
        cb.ContextBridge([cb.Field("a"), cb.Field("a")])
    with pytest.raises(cb.FieldConfigError, match="at least one"):
        cb.ContextBridge([])
    with pytest.raises(cb.FieldConfigError, match="Field instances"):
        cb.ContextBridge(["request_id"])  # type: ignore[list-item]


def test_default_validation_is_printable_text_up_to_max_length() -> None:
    """By default a value is printable text, no control characters, at most 256 characters."""
    field = cb.Field("note")
    assert field.problem("héllo wörld ✓") is None
    assert "not printable" in str(field.problem("a\r\nb"))  # says why, not just "rejected"
    assert cb.Field("code", validator=r"[a-z]+").problem("A1") == "rejected by the validator"
    assert field.problem("x" * 256) is None
    assert "max_length" in str(field.problem("x" * 257))
    assert "str" in str(field.problem(42))


def test_custom_validators_regex_compiled_and_callable() -> None:
    """Validators may be a regex string, a compiled pattern or a predicate; a raising
    predicate counts as a rejection, not a crash."""
    assert cb.Field("a", validator=r"[a-z]+").problem("abc") is None
    assert cb.Field("a", validator=r"[a-z]+").problem("abc1") is not None
    assert cb.Field("a", validator=re.compile(r"\d+")).problem("12") is None
    assert cb.Field("a", validator=str.isdigit).problem("x") is not None

    def explode(value: str) -> bool:
        raise RuntimeError(value)

    assert "raised" in str(cb.Field("a", validator=explode).problem("v"))


def test_request_id_pattern_accepts_common_ids_and_rejects_hostile_ones() -> None:
    """UUIDs, 32-hex ids and nginx ids pass; CRLF, spaces, overlong ids do not."""
    field = cb.Field("request_id", validator=cb.REQUEST_ID_PATTERN)
    for good in (cb.new_request_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "req-1.2_3:abc"):
        assert field.problem(good) is None, good
    for bad in ("a\r\nSet-Cookie: x", "has space", "x" * 129, "", "<script>"):
        assert field.problem(bad) is not None, bad


def test_process_local_fields_accept_objects() -> None:
    """A process-local field may hold any object; only strings are length-checked."""
    field = cb.Field("connection", propagate=False)
    assert field.problem(object()) is None


def test_redaction_modes() -> None:
    """Hash, mask and callable redaction change what spans and logs show."""
    hashed = cb.Field("email", redact=True).shown("bob@example.com")
    assert isinstance(hashed, str)
    assert hashed.startswith("sha256:")
    assert "bob" not in hashed
    assert cb.Field("email", redact="mask").shown("bob@example.com") == "****"
    assert cb.Field("email", redact=lambda v: v[:1] + "…").shown("bob") == "b…"
    assert cb.Field("email").shown("bob") == "bob"


def test_new_request_id_is_unique_uuid4_text() -> None:
    """new_request_id gives distinct canonical UUID4 strings (version 4, RFC 4122 variant),
    across many batches."""
    ids = {cb.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_new_request_id_never_repeats_across_threads() -> None:
    """Threads taking ids from the shared batch at once never get the same one."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = list(pool.map(lambda _: [cb.new_request_id() for _ in range(500)], range(8)))
    every = [i for batch in batches for i in batch]
    assert len(set(every)) == len(every) == 4000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_new_request_id_in_a_forked_child_differs_from_the_parent() -> None:
    """A forked worker (gunicorn, multiprocessing's fork) does not reuse the ids the parent
    had minted but not handed out: both sides draw fresh ones."""
    cb.new_request_id()  # the parent now holds a partly used batch
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns about forking a process that has threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child process
        os.close(read)
        os.write(write, ",".join(cb.new_request_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    parent = {cb.new_request_id() for _ in range(10)}
    assert len(child) == 10
    assert not child & parent


def test_attribute_prefix_must_be_printable_text() -> None:
    """A prefix that would make attribute names with control characters is refused."""
    with pytest.raises(cb.FieldConfigError, match="attribute_prefix"):
        cb.ContextBridge([cb.Field("a")], attribute_prefix="app.\n")


def test_text_no_carrier_or_exporter_can_encode_is_refused() -> None:
    """A lone surrogate passes a permissive validator but not the field: it could be neither
    injected as baggage nor exported, so it is refused at write time, naming the field."""
    field = cb.Field("note", validator=r".*")
    assert field.problem("\ud800") is not None
    assert field.problem("caf\u00e9 \U0001f600") is None
    bridge = cb.ContextBridge([field])
    with pytest.raises(cb.ContextValueError, match="note"), bridge.scope(note="a\udc80b"):
        pass


def test_redaction_covers_values_that_are_not_strings() -> None:
    """A redacted process-local field holding a number (or any object) is shown through its
    text, redacted: never in clear."""
    field = cb.Field("user_id", propagate=False, redact=True)
    shown = field.shown(42)
    assert shown == field.shown("42")
    assert isinstance(shown, str)
    assert shown.startswith("sha256:")
    assert cb.Field("user_id", propagate=False, redact="mask").shown(object()) == "****"
    assert cb.Field("user_id", propagate=False).shown(42) == 42


def test_attribute_values() -> None:
    """Spans get str, bool, int and float; an int OTLP cannot carry becomes text; other
    objects are not attribute values."""
    assert [cb.fields.attribute_value(v) for v in ("a", True, 7, 1.5)] == ["a", True, 7, 1.5]
    assert cb.fields.attribute_value(2**64) == str(2**64)
    assert cb.fields.attribute_value(-(2**63)) == -(2**63)
    assert cb.fields.attribute_value({"a": 1}) is None
    assert cb.fields.attribute_value(None) is None


def test_unknown_field_errors_list_the_declared_fields() -> None:
    """A misspelt field name is refused with the names that are declared, on write and read."""
    bridge = cb.ContextBridge([cb.Field("tenant_id"), cb.Field("user_id")])
    with pytest.raises(cb.UnknownFieldError, match=r"'tenantid'.*tenant_id, user_id"):
        bridge.scope(tenantid="acme").__enter__()
    with pytest.raises(cb.UnknownFieldError, match=r"'tenantid'.*tenant_id, user_id"):
        bridge.get("tenantid")
