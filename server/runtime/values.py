"""The value rules every domain shares: times in microseconds, the depth of free-form maps."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from server.runtime.errors import InvalidArgument

__all__ = ["MAX_VALUE_DEPTH", "check_depth", "to_us", "from_us"]


#: Attributes and event data: the map itself and at most this many further levels of maps
#: and arrays.
MAX_VALUE_DEPTH = 32
_CONTAINERS = frozenset((dict, list))


def check_depth(value: dict[str, Any], field: str, what: str) -> None:
    """Refuse attributes or event data that nest deeper than `MAX_VALUE_DEPTH`.

    This and decoding them as ``dict[str, Any]`` (string keys at the top, valid timestamps,
    hashable keys below) are the rules both obey (section 4.2 of PROTOCOL.md), so that what
    is stored can be read back. Raises `InvalidArgument` naming the first container too deep
    (``field`` is the map's own path, ``$.attributes``; ``what`` names it in the message).
    """
    for item in value.values():  # most maps hold no map or array: this is all they cost
        if type(item) in _CONTAINERS:
            _check_depth(value, field, what, 0)
            return


def _check_depth(value: Any, field: str, what: str, depth: int) -> None:
    if depth > MAX_VALUE_DEPTH:
        raise InvalidArgument(f"{what} nest deeper than {MAX_VALUE_DEPTH} levels", field=field)
    if type(value) is dict:
        for key, item in value.items():
            if type(item) in _CONTAINERS:
                _check_depth(item, f"{field}.{key}", what, depth + 1)
    else:
        for index, item in enumerate(value):
            if type(item) in _CONTAINERS:
                _check_depth(item, f"{field}[{index}]", what, depth + 1)


def to_us(dt: datetime) -> int:
    return (dt - _EPOCH) // _US


def from_us(us: int) -> datetime:
    return _EPOCH + us * _US


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = datetime.resolution  # one microsecond
