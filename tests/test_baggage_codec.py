"""W3C Baggage on the wire: encoding, strict parsing, limits, and interoperability."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import attach, detach

import otel_ctxbridge as cb
from otel_ctxbridge.limits import MAX_HEADER_BYTES, format_baggage, parse_baggage

_values = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=60
).filter(lambda v: v.isprintable() and v == v.strip())


@settings(max_examples=300, deadline=None)
@given(request_id=_values, tenant_id=_values)
def test_inject_extract_round_trips_unicode(request_id: str, tenant_id: str) -> None:
    """Any printable Unicode value survives inject -> extract unchanged."""
    bridge = cb.ContextBridge(
        [cb.Field("request_id", inbound="always"), cb.Field("tenant_id", inbound="always")]
    )
    with bridge.scope(request_id=request_id, tenant_id=tenant_id):
        carrier = bridge.inject({})
    assert bridge.extract(carrier) == {"request_id": request_id, "tenant_id": tenant_id}


@settings(max_examples=300, deadline=None)
@given(tenant_id=_values)
def test_a_service_without_this_library_reads_the_same_values(tenant_id: str) -> None:
    """OTel Python's own propagator + get_baggage read back exactly what was injected."""
    bridge = cb.ContextBridge([cb.Field("tenant_id")])
    with bridge.scope(tenant_id=tenant_id):
        carrier = bridge.inject({})
    ctx = propagate.extract(carrier)
    assert baggage.get_baggage("tenant_id", ctx) == tenant_id
    ctx = W3CBaggagePropagator().extract(carrier)
    assert baggage.get_baggage("tenant_id", ctx) == tenant_id


@settings(max_examples=300, deadline=None)
@given(
    value=st.text(
        st.characters(blacklist_categories=("Cs",), whitelist_characters=" \t\u3000\xa0"),
        min_size=1,
        max_size=30,
    )
)
def test_a_propagated_value_is_refused_or_read_back_unchanged_by_opentelemetry(value: str) -> None:
    """No value reaches a downstream service changed: one that OTel Python's propagator would
    read back differently (whitespace at either end, which it strips) is refused at write time
    with a ``ContextValueError``; every value accepted is read back exactly."""
    bridge = cb.ContextBridge([cb.Field("note", validator=lambda v: True)])
    try:
        with bridge.scope(note=value):
            carrier = bridge.inject({})
    except cb.ContextValueError:
        assert value != value.strip()
        return
    read = baggage.get_baggage("note", W3CBaggagePropagator().extract(carrier))
    assert read == value


@pytest.mark.parametrize("value", [" lead", "trail ", "   ", "\u3000wide", "x\xa0"])
def test_whitespace_at_either_end_is_refused_for_propagated_fields_only(value: str) -> None:
    """Whitespace at an end is refused with a reason naming it for a propagated field (the
    default check and a regex validator alike, on the compiled and the Python path), kept in a
    process-local field (it never travels), and allowed inside a value."""
    bridge = cb.ContextBridge(
        [
            cb.Field("note"),
            cb.Field("code", validator=r"[\s\S]*"),
            cb.Field("memo", propagate=False, validator=r"[\s\S]*"),
        ]
    )
    for name in ("note", "code"):
        with pytest.raises(cb.ContextValueError, match=f"{name}.*whitespace"):
            with bridge.scope(**{name: value}):
                pass
    with bridge.scope(code="a b", memo=value):
        assert bridge.get("memo") == value
        carrier = bridge.inject({})
    assert baggage.get_all(W3CBaggagePropagator().extract(carrier)) == {"code": "a b"}


def test_inbound_baggage_with_whitespace_at_an_end_is_dropped() -> None:
    """A member decoding to a value with whitespace at an end (``%20lead``) is dropped on
    extract like any other invalid value, and the valid members are kept."""
    bridge = cb.ContextBridge([cb.Field("tenant_id"), cb.Field("note")])
    carrier = {"baggage": "tenant_id=%20acme,note=ok"}
    assert bridge.extract(carrier, trusted=True) == {"note": "ok"}


def test_encoding_uses_percent_20_and_encodes_plus() -> None:
    """A space is %20 (never +) and a plus is %2B, so W3C and OTel parsers agree."""
    assert format_baggage({"k": "a b+c,d;e=f%"}) == "k=a%20b%2Bc%2Cd%3Be%3Df%25"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("k=v;prop=1;flag", {"k": "v"}),
        ("k=a+b", {"k": "a+b"}),
        (" k = v , j=w\t", {"k": "v", "j": "w"}),
        ("k=caf%C3%A9", {"k": "café"}),
        ("k=%E2%9C%93;p", {"k": "✓"}),
        ("k=v,,j=w", {"k": "v", "j": "w"}),
        ("k=v,bad key=x", {"k": "v"}),
        ("k=v,j=%ZZ", {"k": "v"}),
        ("k=v,j=%C3", {"k": "v", "j": "\ufffd"}),
        ("k=v,noequals", {"k": "v"}),
        ('k=v,j="quoted"', {"k": "v"}),
        ("k=1,k=2", {"k": "2"}),
    ],
)
def test_parse_follows_w3c_baggage(header: str, expected: dict[str, str]) -> None:
    """Properties are metadata, + is literal, values are percent-decoded UTF-8, whitespace
    is trimmed, and malformed members are dropped without losing the valid ones."""
    assert parse_baggage(header)[0] == expected


def test_parse_keeps_the_first_members_within_the_limits() -> None:
    """Past 180 members or 8192 bytes, extra members are dropped and counted."""
    members, dropped = parse_baggage(",".join(f"k{i}=v" for i in range(200)))
    assert len(members) == 180
    assert dropped == 20
    members, dropped = parse_baggage(",".join(f"k{i}={'x' * 1000}" for i in range(10)))
    assert len(members) == 8
    assert dropped == 2
    members, _ = parse_baggage(["a=1", "b=2"])
    assert members == {"a": "1", "b": "2"}


def test_writes_over_the_baggage_limits_raise_naming_the_field() -> None:
    """Values that OTel would silently drop at inject time are refused at write time."""
    bridge = cb.ContextBridge(
        [cb.Field(f"f{i}", max_length=4096) for i in range(3)] + [cb.Field("small")]
    )
    with pytest.raises(cb.ContextValueError, match=r"f0.*4096"):
        with bridge.scope(f0="é" * 2000):  # 2000 chars, 12000 bytes once encoded
            pass
    with (
        bridge.scope(f0="x" * 4000, f1="y" * 4000),
        pytest.raises(cb.ContextValueError, match=rf"f2.*{MAX_HEADER_BYTES}"),
    ):
        with bridge.scope(f2="z" * 1000):
            pass
    many = {f"m{i}": "v" for i in range(180)}
    ctx = propagate.extract({"baggage": ",".join(f"{k}={v}" for k, v in many.items())})
    token = attach(ctx)
    try:
        with pytest.raises(cb.ContextValueError, match="180"), bridge.scope(small="v"):
            pass
    finally:
        detach(token)


def test_an_ascii_value_that_grows_past_the_member_limit_when_encoded_is_refused() -> None:
    """Printable ASCII that percent-encoding triples (spaces, quotes) is held to the 4096-byte
    member limit too, even when the whole header would stay under 8192 bytes; a value that
    fits once encoded is accepted and read back unchanged by OTel."""
    bridge = cb.ContextBridge([cb.Field("note", max_length=4096, validator=r"[ -~]*")])
    too_long = "x" + " " * 2000 + "x"
    with pytest.raises(cb.ContextValueError, match=r"note.*4096"), bridge.scope(note=too_long):
        pass
    fits = "x" + " " * 1358 + "x"  # note= + 2 + 1358 * 3 = 4081 bytes
    with bridge.scope(note=fits):
        header = bridge.inject({})["baggage"]
    assert len(header) <= 4096
    assert baggage.get_all(W3CBaggagePropagator().extract({"baggage": header})) == {"note": fits}


def test_the_member_limit_holds_for_opentelemetrys_own_propagator_too() -> None:
    """A value that fits 4096 bytes as this library encodes it but not as OTel Python's
    ``quote_plus`` does (slashes: kept by the W3C encoding, escaped by OTel's) is refused at
    write time: a service on OTel's default propagator would drop it silently on inject.
    Spaces, which OTel sends as ``+``, are counted as the larger of the two encodings."""
    bridge = cb.ContextBridge([cb.Field("path", max_length=4096, validator=r"[ -~]*")])
    slashes = "/" * 2000  # path= + 2000 bytes here, 6000 with OTel's encoding
    with pytest.raises(cb.ContextValueError, match=r"path.*4096"), bridge.scope(path=slashes):
        pass
    carrier: dict[str, str] = {}
    W3CBaggagePropagator().inject(carrier, baggage.set_baggage("path", slashes))
    assert "baggage" not in carrier  # what OTel does with it: dropped without a word
    fits = "/" * 1360  # path= + 1360 * 3 = 4085 bytes with OTel's encoding
    with bridge.scope(path=fits):
        header = bridge.inject({})["baggage"]
        W3CBaggagePropagator().inject(carrier)
    assert header == f"path={fits}"
    assert baggage.get_all(W3CBaggagePropagator().extract(carrier)) == {"path": fits}


def test_the_header_limit_counts_keys_other_code_extracted_as_otel_encodes_them() -> None:
    """Baggage OTel's propagator extracted may have keys of any characters (it decodes %XX in
    keys); they count as OTel encodes them again, so a small write that would push the header
    past 8192 bytes on OTel's inject (which then drops members silently) is refused."""
    keys = quote("\U0001f600" * 310), quote("\U0001f601" * 300)
    inbound = W3CBaggagePropagator().extract({"baggage": f"{keys[0]}=a,{keys[1]}=b"})
    assert len(baggage.get_all(inbound)) == 2
    bridge = cb.ContextBridge([cb.Field("note", max_length=4096, validator=r"[ -~]*")])
    token = attach(inbound)
    try:
        with pytest.raises(cb.ContextValueError, match=r"note.*8192"):
            with bridge.scope(note="," * 330):  # 990 bytes more as OTel encodes it
                pass
        with bridge.scope(note="," * 200):  # fits: OTel sends it
            carrier: dict[str, str] = {}
            W3CBaggagePropagator().inject(carrier)
        assert "note=" in carrier["baggage"]
    finally:
        detach(token)


def test_baggage_propagator_is_w3c_correct_and_interoperable() -> None:
    """cb.BaggagePropagator injects %20 and extracts properties as metadata."""
    propagator = cb.BaggagePropagator()
    ctx = propagator.extract({"baggage": "k=a%20b;p=1,j=x+y"})
    assert baggage.get_baggage("k", ctx) == "a b"
    assert baggage.get_baggage("j", ctx) == "x+y"
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=ctx)
    assert carrier == {"baggage": "k=a%20b,j=x%2By"}
    assert propagator.fields == {"baggage"}
    assert propagator.extract({"baggage": "\udcff=bad"}) is not None


def test_a_limit_error_names_the_largest_value_written_and_the_sizes() -> None:
    """Forty fields written at once past the 8192-byte header: the error names the field with
    the largest value (the one to shorten), not merely the first, and says how large the header
    would be; past 180 members it says how many there would be."""
    bridge = cb.ContextBridge([cb.Field(f"f{i}", max_length=300) for i in range(40)])
    values = {f"f{i}": "x" * 200 for i in range(40)}
    values["f17"] = "x" * 300
    with pytest.raises(cb.ContextValueError, match=r"'f17'.*8192 B \(\d+ B") as raised:
        with bridge.scope(**values):
            pass
    assert raised.value.field == "f17"
    many = cb.ContextBridge([cb.Field(f"m{i}") for i in range(200)])
    with pytest.raises(cb.ContextValueError, match=r"180 members \(200, 200 of them"):
        with many.scope(**{f"m{i}": "v" for i in range(200)}):
            pass
