"""Handler serialization: the security boundary between a stored job and running code.

A handler is JSON ``{"kind": "module:QualName", "attrs": {...}}``. Attribute values are
JSON values, or tagged objects ``{"__tq__": tag, ...}`` for datetimes, bytes, tuples, nested
payload objects and references to functions/classes.

Loading never imports anything and never evaluates anything: a kind resolves only when its
module is in the allowed set *and* already in ``sys.modules``.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from collections.abc import Callable, Collection
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from tomqueue.errors import HandlerError, SerializationError

_TAG = "__tq__"
_KIND_PREFIX = re.compile(r'\{"kind":"([A-Za-z0-9_.:]{1,512})"')
_MAX_DEPTH = 32
_PLAIN = frozenset({type(None), bool, int, str})  # JSON values as they are (not subclasses)
# one encoder for every dump (json.dumps with these options builds a new one per call)
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
ALWAYS_ALLOWED = frozenset({"tomqueue.delay"})


def _one_shot_encoder() -> Callable[[dict[str, Any]], str]:
    """``_ENCODER.encode`` for a handler's dict, with CPython's C encoder built once:
    ``JSONEncoder.encode`` builds one per call, 2.5 of the 3.6 µs it takes for a small
    handler (and per job in ``enqueue_many``). No check for cycles: ``_encode`` builds a new
    tree of bounded depth. Falls back to ``_ENCODER.encode`` where the C encoder is missing
    or takes other arguments."""
    make: Callable[..., Any] | None = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator
        return _ENCODER.encode
    try:
        encode = make(  # the arguments JSONEncoder.iterencode gives it, in its order
            None,  # markers: no cycle check
            _ENCODER.default,
            json.encoder.encode_basestring_ascii,
            None,  # indent
            ":",
            ",",
            False,  # sort_keys
            False,  # skipkeys
            False,  # allow_nan
        )
    except TypeError:  # another signature
        return _ENCODER.encode
    return lambda value: "".join(encode(value, 0))


_encode_handler = _one_shot_encoder()


def kind_of(obj: object) -> str:
    """``module:QualName`` of a class, function or method owner."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<locals>" in qualname or "<lambda>" in qualname:
        raise SerializationError(
            f"{obj!r} has no importable name (module:QualName); define it at module level"
        )
    return f"{module}:{qualname}"


def dump(payload: object) -> str:
    """The JSON handler of a payload object (anything with ``perform()``)."""
    return dump_with_kind(payload)[1]


def dump_with_kind(payload: object) -> tuple[str, str]:
    """(the payload's kind, its JSON handler): ``enqueue`` names the kind in the
    notification's headers without reading it back out of the handler."""
    if not callable(getattr(payload, "perform", None)):
        raise SerializationError(
            f"{type(payload).__name__} cannot be enqueued: it has no perform() method"
        )
    kind = kind_of(type(payload))
    return kind, _encode_handler({"kind": kind, "attrs": _encode_attrs(payload, "payload", 0)})


def handler_kind(handler: str) -> str:
    """The kind a stored handler names, without loading it ('<malformed>' if unreadable).

    Handlers we write start with their kind, so a prefix match answers without parsing a
    large handler; anything else is parsed (and may be hostile: never raises)."""
    match = _KIND_PREFIX.match(handler)
    if match:
        return match.group(1)
    try:
        kind = json.loads(handler).get("kind")
    except Exception:
        return "<malformed>"
    return kind if isinstance(kind, str) else "<malformed>"


def load(handler: str, allowed_modules: Collection[str]) -> Any:
    """Rebuild the payload object; ``HandlerError`` if malformed or not allowed.

    Whatever goes wrong while rebuilding (a missing attribute, absurd nesting, a class whose
    ``__setstate__`` raises) is a ``HandlerError``: the job fails, the worker carries on."""
    try:
        body = json.loads(handler)
        if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
            raise HandlerError("handler must be a JSON object with a string 'kind'")
        return _build(body, allowed_modules, 0)
    except HandlerError:
        raise
    except RecursionError:
        raise HandlerError("handler is nested too deeply") from None
    except (ValueError, TypeError) as exc:
        raise HandlerError(f"handler is not valid JSON: {exc}") from None
    except Exception as exc:
        raise HandlerError(f"handler cannot be rebuilt: {type(exc).__name__}: {exc}") from None


# --- encoding ---------------------------------------------------------------------------


def _encode_attrs(obj: object, path: str, depth: int) -> dict[str, Any]:
    state = obj.__getstate__() if hasattr(type(obj), "__getstate__") else None
    if not isinstance(state, dict):
        state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict):
        raise SerializationError(f"{path}: {type(obj).__name__} has no attribute dictionary")
    # a plain value is stored as it is, without spelling out its path (only errors need one),
    # unless it lies past the depth limit, which _encode refuses
    plain = _PLAIN if depth < _MAX_DEPTH else frozenset()
    return {
        str(k): v if type(v) in plain else _encode(v, f"{path}.{k}", depth + 1)
        for k, v in state.items()
    }


def _encode(value: Any, path: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise SerializationError(f"{path}: nested deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SerializationError(f"{path}: {value!r} is not representable in JSON")
        return value
    if isinstance(value, list):
        return [_encode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {
            _TAG: "tuple",
            "v": [_encode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)],
        }
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and _TAG not in value:
            return {k: _encode(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
        raise SerializationError(f"{path}: dict keys must be strings (and not {_TAG!r})")
    return _encode_object(value, path, depth)


def _encode_object(value: Any, path: str, depth: int) -> Any:
    if isinstance(value, datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, date):
        return {_TAG: "date", "v": value.isoformat()}
    if isinstance(value, Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, bytes | bytearray):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, type) or (
        callable(value) and hasattr(value, "__qualname__") and not hasattr(value, "__self__")
    ):
        return {_TAG: "ref", "kind": kind_of(value)}
    if hasattr(value, "__self__") and hasattr(value, "__func__"):  # bound method
        return {
            _TAG: "method",
            "self": _encode(value.__self__, f"{path}.__self__", depth + 1),
            "name": value.__func__.__name__,
        }
    if hasattr(value, "__dict__") and type(value).__module__ not in ("builtins",):
        return {
            _TAG: "object",
            "kind": kind_of(type(value)),
            "attrs": _encode_attrs(value, path, depth),
        }
    raise SerializationError(
        f"{path}: a {type(value).__name__} cannot be stored in a job handler "
        "(use JSON values, datetimes, bytes or objects of module-level classes)"
    )


# --- decoding ---------------------------------------------------------------------------


def _resolve(kind: Any, allowed: Collection[str]) -> Any:
    if not isinstance(kind, str) or kind.count(":") != 1:
        raise HandlerError(f"kind {kind!r} is not of the form module:QualName")
    module_name, qualname = kind.split(":")
    if module_name not in allowed and module_name not in ALWAYS_ALLOWED:
        raise HandlerError(
            f"kind {kind!r} is in module {module_name!r}, which this worker was not told to "
            "load (start it with --import " + module_name + ")"
        )
    module = sys.modules.get(module_name)
    if module is None:
        raise HandlerError(f"module {module_name!r} of kind {kind!r} is not imported")
    obj: Any = module
    for part in qualname.split("."):
        if not part.isidentifier() or part.startswith("__"):
            raise HandlerError(f"kind {kind!r} has an invalid name part {part!r}")
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(f"kind {kind!r}: {module_name} has no {qualname}") from None
    if getattr(obj, "__module__", None) != module_name:
        raise HandlerError(f"kind {kind!r} resolves to something defined elsewhere")
    return obj


def _build(body: dict[str, Any], allowed: Collection[str], depth: int) -> Any:
    cls = _resolve(body.get("kind"), allowed)
    if not isinstance(cls, type):
        raise HandlerError(f"kind {body.get('kind')!r} is not a class")
    attrs = body.get("attrs", {})
    if not isinstance(attrs, dict):
        raise HandlerError("handler 'attrs' must be an object")
    obj: Any = object.__new__(cls)
    state = {k: _decode(v, allowed, depth + 1) for k, v in attrs.items()}
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None and getattr(cls, "__setstate__", None) is not getattr(
        object, "__setstate__", None
    ):
        setstate(state)
    else:
        obj.__dict__.update(state)
    return obj


def _decode(value: Any, allowed: Collection[str], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise HandlerError("handler nested too deeply")
    if isinstance(value, list):
        return [_decode(v, allowed, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag is None:
        return {k: _decode(v, allowed, depth + 1) for k, v in value.items()}
    try:
        return _decode_tagged(tag, value, allowed, depth)
    except (ValueError, TypeError, KeyError) as exc:
        raise HandlerError(f"bad {tag!r} value in handler: {exc}") from None


def _decode_tagged(tag: Any, value: dict[str, Any], allowed: Collection[str], depth: int) -> Any:
    if tag == "tuple":
        return tuple(_decode(v, allowed, depth + 1) for v in value["v"])
    if tag == "datetime":
        return datetime.fromisoformat(value["v"])
    if tag == "date":
        return date.fromisoformat(value["v"])
    if tag == "decimal":
        return Decimal(value["v"])
    if tag == "bytes":
        return base64.b64decode(value["v"], validate=True)
    if tag == "ref":
        return _resolve(value["kind"], allowed)
    if tag == "object":
        return _build(value, allowed, depth + 1)
    if tag == "method":
        target = _decode(value["self"], allowed, depth + 1)
        name = value["name"]
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise HandlerError(f"method name {name!r} is not allowed")
        return getattr(target, name)
    raise HandlerError(f"unknown tag {tag!r} in handler")
