"""The W3C Baggage test suite's cases, against the codec and through its test service."""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from otel_ctxbridge.limits import BaggageEntry, format_baggage_entries, parse_baggage_entries
from tests._servers import serve

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from w3c_baggage_service import app

ODD = "\t \"';=asdf!@#$%^&*()"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("SomeKey=SomeValue", [("SomeKey", "SomeValue", ())]),
        (
            "SomeKey=SomeValue;SomeProp,SomeKey2=SomeValue2;ValueProp=PropVal",
            [
                ("SomeKey", "SomeValue", (("SomeProp", None),)),
                ("SomeKey2", "SomeValue2", (("ValueProp", "PropVal"),)),
            ],
        ),
        (
            "SomeKey \t = \t SomeValue \t ; \t SomeProp \t , \t SomeKey2 \t = \t SomeValue2 "
            "\t ; \t ValueProp \t = \t PropVal",
            [
                ("SomeKey", "SomeValue", (("SomeProp", None),)),
                ("SomeKey2", "SomeValue2", (("ValueProp", "PropVal"),)),
            ],
        ),
        ("SomeKey=SomeValue=equals", [("SomeKey", "SomeValue=equals", ())]),
        (f"SomeKey \t = \t {quote(ODD)} \t ", [("SomeKey", ODD, ())]),
        (
            "SomeKey=SomeValue;SomeProp;SecondProp=PropValue",
            [("SomeKey", "SomeValue", (("SomeProp", None), ("SecondProp", "PropValue")))],
        ),
        (
            "SomeKey \t = \t SomeValue \t ; \t SomeProp \t ; \t SecondProp \t = \t PropValue",
            [("SomeKey", "SomeValue", (("SomeProp", None), ("SecondProp", "PropValue")))],
        ),
        (
            "SomeKey \t = \t SomeValue \t ; \t SomePropKey=SomePropValue \t , \t SomeKey2 "
            "\t = \t SomeValue2 \t ; \t SomePropKey2 \t = \t SomePropValue2",
            [
                ("SomeKey", "SomeValue", (("SomePropKey", "SomePropValue"),)),
                ("SomeKey2", "SomeValue2", (("SomePropKey2", "SomePropValue2"),)),
            ],
        ),
        (f"SomeKey={quote(ODD)}", [("SomeKey", ODD, ())]),
        (
            "key1=value1;property1;property2, key2 = value2, "
            "key3=value3; propertyKey=propertyValue",
            [
                ("key1", "value1", (("property1", None), ("property2", None))),
                ("key2", "value2", ()),
                ("key3", "value3", (("propertyKey", "propertyValue"),)),
            ],
        ),
        (
            "userId=Am%C3%A9lie,serverNode=DF%2028,isProduction=false",
            [("userId", "Amélie", ()), ("serverNode", "DF 28", ()), ("isProduction", "false", ())],
        ),
        ("k=", [("k", "", ())]),
    ],
)
def test_parse_cases_of_the_w3c_suite(
    header: str, expected: list[tuple[str, str, tuple[tuple[str, str | None], ...]]]
) -> None:
    """Keys, values, properties, optional whitespace and percent-encoding as the suite expects."""
    entries, dropped = parse_baggage_entries(header)
    assert dropped == 0
    assert [tuple(e) for e in entries] == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("a=%FF", [("a", "\ufffd", ())]),
        ("a=x%C3,b=2", [("a", "x\ufffd", ()), ("b", "2", ())]),
        ("a=%E2%82%41", [("a", "\ufffdA", ())]),
        ("a=1;p=%C0%AF", [("a", "1", (("p", "\ufffd\ufffd"),))]),
    ],
)
def test_escapes_that_are_not_utf8_become_the_replacement_character(
    header: str, expected: list[tuple[str, str, tuple[tuple[str, str | None], ...]]]
) -> None:
    """W3C Baggage: percent-encoded octets that are not UTF-8 MUST be replaced with U+FFFD;
    the member (and its neighbours) are kept, in values and in property values."""
    entries, dropped = parse_baggage_entries(header)
    assert dropped == 0
    assert [tuple(e) for e in entries] == expected


def test_percent_encoded_value_round_trips() -> None:
    """A value with every awkward character serializes as the suite's reference implementation
    does (``test_parse_percent_encoded`` and ``..._property``), and parses back to itself."""
    encoded = "%09%20%22%27%3B%3Dasdf%21%40%23%24%25%5E%26%2A%28%29"
    header = format_baggage_entries([BaggageEntry("SomeKey", ODD)])
    assert header == f"SomeKey={encoded}"
    assert parse_baggage_entries(header)[0] == [BaggageEntry("SomeKey", ODD)]
    with_property = format_baggage_entries(
        [BaggageEntry("SomeKey", "SomeValue", (("SomePropKey", ODD),))]
    )
    assert with_property == f"SomeKey=SomeValue;SomePropKey={encoded}"


def test_propagates_at_least_64_members_and_8192_bytes() -> None:
    """At least 64 members, and one member filling a whole 8192-byte header, are kept."""
    many = [BaggageEntry(f"key{i}", "value") for i in range(64)]
    assert len(format_baggage_entries(many).split(",")) == 64
    assert len(parse_baggage_entries(format_baggage_entries(many))[0]) == 64
    long_value = "0123456789" * 819
    header = format_baggage_entries([BaggageEntry("a", long_value)])
    assert len(header) == 8192
    assert parse_baggage_entries(header)[0] == [BaggageEntry("a", long_value)]


def test_the_test_service_answers_the_suites_endpoints() -> None:
    """GET /baggage/parse and POST /baggage/serialize behave as the suite's README describes,
    on a real server."""
    with serve(app) as base, httpx.Client(base_url=base) as client:
        parsed = client.get(
            "/baggage/parse",
            headers={"baggage": "MyKey=MyValue;Property1;Property2=Property2Value"},
        )
        assert parsed.json() == [
            {
                "key": "MyKey",
                "value": "MyValue",
                "properties": [
                    {"key": "Property1"},
                    {"key": "Property2", "value": "Property2Value"},
                ],
            }
        ]
        serialized = client.post("/baggage/serialize", json=parsed.json())
        assert serialized.json()["baggage"] == "MyKey=MyValue;Property1;Property2=Property2Value"
        assert serialized.headers["baggage"] == serialized.json()["baggage"]
        assert client.post("/baggage/serialize", json={"not": "a list"}).status_code == 400
        malformed = client.get("/baggage/parse", headers={"baggage": "good=1,bad key=2,=3,k=%ZZ"})
        assert malformed.json() == [{"key": "good", "value": "1", "properties": []}]
        not_utf8 = client.get("/baggage/parse", headers={"baggage": "k=%FF;p=%C3"})
        assert not_utf8.json() == [
            {"key": "k", "value": "\ufffd", "properties": [{"key": "p", "value": "\ufffd"}]}
        ]


def test_more_members_than_otel_carries_keeps_the_first_180_within_8192_bytes() -> None:
    """The suite's 512-member, 8192-byte case: the first 180 members (OpenTelemetry's limit,
    above the 64 the specification requires) are kept, in order, and the rest dropped whole,
    both when parsing the header and when serializing the list."""
    entries = [BaggageEntry(f"{i:03d}", "0123456789a") for i in range(512)]
    header = ",".join(f"{e.key}={e.value}" for e in entries) + "b"  # the last value 1 longer
    assert len(header) == 8192
    parsed = parse_baggage_entries(header)[0]
    assert [e.key for e in parsed] == [f"{i:03d}" for i in range(180)]
    serialized = format_baggage_entries(entries)
    assert serialized.split(",") == [f"{i:03d}=0123456789a" for i in range(180)]
