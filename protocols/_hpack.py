"""HPACK (RFC 7541) for `protocols.h2client`: a stateless encoder for request headers and a
full decoder for response header blocks.

Import these names from `protocols.h2client`, which re-exports them; this module only keeps
the header compression apart from the connection's state machine.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import hpack

from .errors import HeaderListTooLong, HpackError

__all__ = ["StatelessEncoder", "HpackDecoder", "decode_huffman"]


def _hpack_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``flags`` in the first byte's high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC_FIELDS = {(n, v): i for i, (n, v) in enumerate(hpack.table.HeaderTable.STATIC_TABLE, 1)}
_STATIC_NAMES: dict[bytes, int] = {}
for (_name, _), _index in _STATIC_FIELDS.items():
    _STATIC_NAMES.setdefault(_name, _index)


class StatelessEncoder:
    """An HPACK encoder that never uses the dynamic table (and says so: its first block sets
    the table size to 0), so that each field's encoding depends on nothing but the field.

    Push requests repeat almost every field (authority, topic, push type, the provider token),
    so their encodings are cached. Values are sent as they are (no Huffman): a few more
    bytes on the wire. Sensitive fields (`hpack.NeverIndexedHeaderTuple`) are sent as
    never-indexed literals.
    """

    _CACHE_LIMIT = 1024

    def __init__(self) -> None:
        self._first = True
        self._cache: dict[tuple[bytes, bytes, bool], bytes] = {}

    def encode(self, headers: Any) -> bytes:
        cache = self._cache
        parts = []
        if self._first:
            self._first = False
            parts.append(b"\x20")  # dynamic table size update: 0
        for field in headers:
            name, value = field
            sensitive = type(field) is hpack.NeverIndexedHeaderTuple
            key = (name, value, sensitive)
            encoded = cache.get(key)
            if encoded is None:
                encoded = self._field(name, value, sensitive)
                if name != b":path" and (sensitive or len(value) <= 128):  # values that may repeat
                    if len(cache) >= self._CACHE_LIMIT:
                        cache.clear()
                    cache[key] = encoded
            parts.append(encoded)
        return b"".join(parts)

    @staticmethod
    def _field(name: bytes, value: bytes, sensitive: bool) -> bytes:
        if not sensitive:
            index = _STATIC_FIELDS.get((name, value))
            if index is not None:
                return _hpack_integer(index, 7, 0x80)
        flags = 0x10 if sensitive else 0x00  # never indexed / without indexing
        index = _STATIC_NAMES.get(name)
        if index is not None:
            head = _hpack_integer(index, 4, flags)
        else:
            head = bytes((flags,)) + _hpack_integer(len(name), 7, 0) + name
        return head + _hpack_integer(len(value), 7, 0) + value


_STATIC_TABLE = hpack.table.HeaderTable.STATIC_TABLE
_HUFFMAN_STEPS: dict[int, tuple[int, bytes, bool]] = {}


def _huffman_step(state: int, byte: int) -> tuple[int, bytes, bool]:
    """hpack's nibble-table Huffman decoder, two nibbles (one byte) at once."""
    from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE

    out = b""
    flags = 0
    for nibble in (byte >> 4, byte & 0x0F):
        state, flags, symbol = HUFFMAN_TABLE[state * 16 + nibble]
        if flags & HUFFMAN_FAIL:
            raise HpackError("an invalid Huffman string")
        if flags & HUFFMAN_EMIT_SYMBOL:
            out += bytes((symbol,))
    return state, out, bool(flags & HUFFMAN_COMPLETE)


def decode_huffman(data: bytes) -> bytes:
    """Decode an HPACK Huffman string (RFC 7541 5.2), one byte per step (steps are tabled
    as they are first met: at most 256 states x 256 bytes)."""
    steps = _HUFFMAN_STEPS
    state = 0
    complete = True
    out = bytearray()
    for byte in data:
        key = state << 8 | byte
        step = steps.get(key)
        if step is None:
            step = steps[key] = _huffman_step(state, byte)
        state, emitted, complete = step
        if emitted:
            out += emitted
    if not complete:
        raise HpackError("an incomplete Huffman string")
    return bytes(out)


class HpackDecoder:
    """An HPACK decoder (RFC 7541) for response header blocks: the static and dynamic
    tables, Huffman strings, table size updates up to ``max_table_size`` (our
    SETTINGS_HEADER_TABLE_SIZE), and a bound on the decoded header list."""

    #: How Huffman strings are decoded (a subclass may cache it).
    huffman = staticmethod(decode_huffman)

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 65536) -> None:
        self.max_table_size = max_table_size
        self.max_header_list_size = max_header_list_size
        self.table_size = max_table_size
        #: The dynamic table, oldest first, and its size as RFC 7541 4.1 counts it.
        self.entries: deque[tuple[bytes, bytes]] = deque()
        self.size = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        fields: list[tuple[bytes, bytes]] = []
        pos = 0
        end = len(block)
        total = 0
        integer = self._integer
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = integer(block, pos, 0x7F)
                field = self._field(index)
            elif first & 0x20 and not first & 0x40:  # dynamic table size update
                if fields:
                    raise HpackError("a table size update after a field")
                size, pos = integer(block, pos, 0x1F)
                if size > self.max_table_size:
                    raise HpackError(f"a table size update to {size}, above our {self.max_table_size}")
                self.table_size = size
                self._evict(0)
                continue
            else:  # a literal: with incremental indexing (01), without (0000) or never indexed (0001)
                index, pos = integer(block, pos, 0x3F if first & 0x40 else 0x0F)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                field = (name, value)
                if first & 0x40:
                    self._add(field)
            total += len(field[0]) + len(field[1]) + 32
            if total > self.max_header_list_size:
                raise HeaderListTooLong(f"a header list over {self.max_header_list_size} bytes")
            fields.append(field)
        return fields

    @staticmethod
    def _integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
        value = block[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            if pos >= len(block):
                raise HpackError("a truncated integer")
            byte = block[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7
            if shift > 28:
                raise HpackError("an integer too large")

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(block):
            raise HpackError("a truncated string")
        huffman = block[pos] & 0x80
        length, pos = self._integer(block, pos, 0x7F)
        if pos + length > len(block):
            raise HpackError("a string longer than its header block")
        data = block[pos:pos + length]
        return (self.huffman(data) if huffman else data), pos + length

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= 61:
            return _STATIC_TABLE[index - 1]
        entries = self.entries
        if 61 < index <= 61 + len(entries):
            return entries[len(entries) - (index - 61)]  # 62 is the newest
        raise HpackError(f"no table entry {index}")

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + 32
        self._evict(size)
        if size <= self.table_size:
            self.entries.append(field)
            self.size += size

    def _evict(self, room: int) -> None:
        entries = self.entries
        while entries and self.size + room > self.table_size:
            name, value = entries.popleft()
            self.size -= len(name) + len(value) + 32
