"""Handler serialization: JSON only, and a security boundary.

A handler is rebuilt only when its kind's module is allowed (``--import``) and already
imported; loading never imports or evaluates anything a payload names.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from tests import jobs
from tomqueue import HandlerError, SerializationError, handler
from tomqueue.delay import PerformableMethod
from tomqueue.handler import dump, dump_with_kind, handler_kind, kind_of, load

ALLOWED = frozenset({"tests.jobs"})


class Local:  # defined in this test module, which no worker is told to load
    def perform(self) -> None:
        pass


def test_round_trip_of_json_values_and_tagged_types() -> None:
    payload = jobs.Record("/tmp/ledger", "m")
    payload.extra = {  # type: ignore[attr-defined]
        "int": 1,
        "float": 1.5,
        "none": None,
        "bool": True,
        "list": [1, "two", [3]],
        "tuple": (1, (2, 3)),
        "when": datetime(2024, 1, 2, 3, 4, 5, 678901),
        "aware": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        "day": date(2024, 2, 29),
        "money": Decimal("12.3400"),
        "raw": b"\x00\xff\xfe binary",
        "surrogate": "lone \udcff surrogate",
        "unicode": "héllo ✓ 😀",
        "ref": jobs.add_to_ledger,
        "cls": jobs.Account,
        "nested": jobs.Account("alice"),
        "method": jobs.Account("bob").deposit,
    }
    text = dump(payload)
    text.encode("ascii")  # ASCII JSON: safe for any column charset
    loaded = load(text, ALLOWED)
    assert type(loaded) is jobs.Record
    assert loaded.path == "/tmp/ledger" and loaded.marker == "m"
    extra = loaded.extra
    original = payload.extra  # type: ignore[attr-defined]
    for key in (
        "int",
        "float",
        "none",
        "bool",
        "list",
        "tuple",
        "when",
        "aware",
        "day",
        "money",
        "raw",
        "surrogate",
        "unicode",
    ):
        assert extra[key] == original[key], key
        assert type(extra[key]) is type(original[key]), key
    assert extra["ref"] is jobs.add_to_ledger
    assert extra["cls"] is jobs.Account
    assert isinstance(extra["nested"], jobs.Account) and extra["nested"].name == "alice"
    assert extra["method"].__self__.name == "bob" and extra["method"].__name__ == "deposit"


def test_handler_is_json_with_kind_and_attrs() -> None:
    body = json.loads(dump(jobs.Record("/p", "m")))
    assert body == {"kind": "tests.jobs:Record", "attrs": {"path": "/p", "marker": "m"}}
    assert handler_kind(dump(jobs.Record("/p", "m"))) == "tests.jobs:Record"
    assert handler_kind("not json") == "<malformed>"
    assert handler_kind('{"kind": 5}') == "<malformed>"


def test_the_encoder_built_once_writes_what_the_standard_one_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``dump`` builds CPython's C encoder once instead of per call; the text is the one
    ``json.JSONEncoder.encode`` writes, byte for byte, and what it refuses is refused."""
    assert handler._encode_handler is not handler._ENCODER.encode  # the fast path, tested
    payload = jobs.Record("/p", "m")
    payload.extra = {  # type: ignore[attr-defined]
        "float": [1.5, -0.0, 1e300, 3.141592653589793],
        "text": 'quote " backslash \\ tab \t é ✓ 😀 \u2028 lone \udcff',
        "nested": {"list": [[], {}, None, True, False, 2**70]},
        "when": datetime(2024, 1, 2, 3, 4, 5, 678901),
    }
    tree = {"kind": "tests.jobs:Record", "attrs": handler._encode_attrs(payload, "payload", 0)}
    assert handler._encode_handler(tree) == handler._ENCODER.encode(tree)
    assert dump(payload) == handler._ENCODER.encode(tree)
    with pytest.raises(ValueError, match="not JSON compliant"):
        handler._encode_handler({"kind": "k", "attrs": {"x": float("nan")}})

    def other_signature(*args: object) -> None:
        raise TypeError("takes 10 arguments")

    monkeypatch.setattr(json.encoder, "c_make_encoder", other_signature)
    assert handler._one_shot_encoder() == handler._ENCODER.encode
    monkeypatch.setattr(json.encoder, "c_make_encoder", None)  # no C accelerator
    assert handler._one_shot_encoder() == handler._ENCODER.encode


def test_performable_method_round_trip() -> None:
    text = dump(PerformableMethod(jobs.Account("z"), "deposit", ("/p", "m"), {"amount": 2}))
    loaded = load(text, ALLOWED)  # tomqueue.delay is always allowed; the target needs --import
    assert (
        loaded.target.name == "z" and loaded.args == ["/p", "m"] and loaded.kwargs == {"amount": 2}
    )
    with pytest.raises(HandlerError, match=r"tests\.jobs"):
        load(text, frozenset())


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (object(), "no perform"),
        (Local(), None),  # fine to dump; loading is what is restricted
    ],
)
def test_dump_requires_perform(payload: object, match: str | None) -> None:
    if match is None:
        assert handler_kind(dump(payload)) == f"{__name__}:Local"
    else:
        with pytest.raises(SerializationError, match=match):
            dump(payload)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (float("nan"), "not representable"),
        (float("inf"), "not representable"),
        ({1: "int key"}, "keys must be strings"),
        ({"__tq__": "x"}, "keys must be strings"),
        (lambda: None, "importable name"),
        ({1, 2}, "cannot be stored"),
        (object(), "cannot be stored"),
    ],
)
def test_unserializable_attributes_name_the_path(value: object, match: str) -> None:
    payload = jobs.Record("/p", "m")
    payload.bad = value  # type: ignore[attr-defined]
    with pytest.raises(SerializationError, match=match) as info:
        dump(payload)
    if match != "importable name":  # kind_of() does not know the attribute path
        assert "payload.bad" in str(info.value)


def test_local_class_cannot_be_dumped() -> None:
    class Inner:
        def perform(self) -> None:
            pass

    with pytest.raises(SerializationError, match="module level"):
        dump(Inner())


def test_too_deep_nesting_is_refused() -> None:
    value: list[object] = []
    for _ in range(40):
        value = [value]
    payload = jobs.Record("/p", "m")
    payload.deep = value  # type: ignore[attr-defined]
    with pytest.raises(SerializationError, match="deeper"):
        dump(payload)


class Node:
    def __init__(self, child: object) -> None:
        self.child = child


def chain(objects: int) -> object:
    """``objects`` nested objects around one string."""
    value: object = "leaf"
    for _ in range(objects):
        value = Node(value)
    return value


def test_a_plain_value_below_the_deepest_level_is_refused() -> None:
    """Plain attribute values take a short cut; the depth limit still counts them: 31
    nested objects hold their string at level 32, 32 hold it at level 33."""
    payload = jobs.Record("/p", "m")
    payload.deep = chain(31)  # type: ignore[attr-defined]
    dump(payload)
    payload.deep = chain(32)  # type: ignore[attr-defined]
    with pytest.raises(SerializationError, match="deeper"):
        dump(payload)


def test_dump_with_kind_names_the_payloads_kind() -> None:
    payload = jobs.Record("/p", "m")
    kind, text = dump_with_kind(payload)
    assert kind == kind_of(jobs.Record) == handler_kind(text) == "tests.jobs:Record"
    assert text == dump(payload)


@pytest.mark.parametrize(
    ("handler", "match"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"attrs": {}}', "string 'kind'"),
        ('{"kind": "no-colon"}', "module:QualName"),
        ('{"kind": "a:b:c"}', "module:QualName"),
        ('{"kind": "os:system"}', "not told to load"),
        ('{"kind": "subprocess:Popen"}', "not told to load"),
        ('{"kind": "builtins:eval"}', "not told to load"),
        ('{"kind": "tests.jobs:NoSuch"}', "has no"),
        ('{"kind": "tests.jobs:Record.__init__"}', "invalid name part"),
        ('{"kind": "tests.jobs:__builtins__"}', "invalid name part"),
        ('{"kind": "tests.jobs:ledger"}', "defined elsewhere"),  # a module imported there
        ('{"kind": "tests.jobs:time.sleep"}', "defined elsewhere"),
        ('{"kind": "tests.jobs:add_to_ledger"}', "not a class"),
        ('{"kind": "tests.jobs:Record", "attrs": [1]}', "'attrs' must be an object"),
        (
            '{"kind": "tests.jobs:Record", "attrs": {"x": {"__tq__": "pickle", "v": ""}}}',
            "unknown tag",
        ),
        (
            '{"kind": "tests.jobs:Record", "attrs": {"x": {"__tq__": "datetime", "v": 5}}}',
            "datetime",
        ),
        ('{"kind": "tests.jobs:Record", "attrs": {"x": {"__tq__": "bytes", "v": "!!"}}}', "bytes"),
        (
            '{"kind": "tests.jobs:Record", "attrs": {"x": {"__tq__": "ref", "kind": "os:system"}}}',
            "not told to load",
        ),
        (
            '{"kind": "tests.jobs:Record", "attrs": {"x": {"__tq__": "object",'
            ' "kind": "os:PathLike", "attrs": {}}}}',
            "not told to load",
        ),
        (
            '{"kind": "tests.jobs:Record", "attrs": {"x": {"__tq__": "method", "self": 1,'
            ' "name": "__class__"}}}',
            "not allowed",
        ),
    ],
)
def test_load_refuses_with_a_clear_handler_error(handler: str, match: str) -> None:
    with pytest.raises(HandlerError, match=match):
        load(handler, ALLOWED)


def test_allowed_but_not_imported_module_is_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported.marker"
    name = "tests_unit_hostile_abc"
    (tmp_path / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "class Evil:\n    def perform(self):\n        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    handler = json.dumps({"kind": f"{name}:Evil", "attrs": {}})

    with pytest.raises(HandlerError, match="not told to load"):
        load(handler, ALLOWED)
    with pytest.raises(HandlerError, match="not imported"):
        load(handler, ALLOWED | {name})  # allowed, yet loading still imports nothing

    assert name not in sys.modules
    assert not marker.exists()


def test_load_does_not_call_init() -> None:
    class_ = jobs.Boom
    loaded = load(json.dumps({"kind": "tests.jobs:Boom", "attrs": {"marker": "x"}}), ALLOWED)
    assert type(loaded) is class_ and loaded.marker == "x"
    assert not hasattr(loaded, "message")  # __init__ did not run


@pytest.mark.parametrize(
    "handler",
    [
        '{"kind":"tests.jobs:Record","attrs":{"x":{"__tq__":"method","self":{"__tq__":"object",'
        '"kind":"tests.jobs:Record","attrs":{}},"name":"no_such_method"}}}',
        '{"kind":"tests.jobs:Record","attrs":{"x":' + "[" * 5000 + "]" * 5000 + "}}",
    ],
    ids=["missing-method", "deep-json"],
)
def test_load_raises_only_handler_error(handler: str) -> None:
    with pytest.raises(HandlerError):
        load(handler, ALLOWED)
