"""HPACK for the client connections: the `hpack` library's encoder and decoder (which the `h2` state machine
calls), each with one change for the CPU's sake. Pure: no I/O.

Decoding: a header block made only of indexed fields (one byte each, every field found in the static or the
dynamic table: what a client repeating a request sends, h2load's and API clients' requests among them) decodes
to the same fields as long as the dynamic table does not change, and such a block does not change it. So the
fields of those blocks are kept, keyed by the block's bytes, and given again without decoding; anything that may
change the table (any other block, a new table size or header list limit) empties the memo first, and a block
the library refused is never kept. The library's decoding of one such block cost more than the rest of a
request's reading (a Python call and a debug log call per field).

Encoding: literals go without Huffman coding (RFC 7541 §5.2 allows either): in pure Python it cost more than the
rest of an answer's head, for a few bytes a literal on the wire. A field found whole in the tables is encoded as
its index, which holds until the dynamic table changes: those encodings are kept, and forgotten whenever a field
is added to the table (or its size changes); a never-indexed field not found whole is written here as the library
writes it; every other field is encoded by the library as before.
"""

from __future__ import annotations

from typing import Any, Final

from hpack import Decoder, Encoder, HeaderTuple
from hpack.hpack import encode_integer

# Every byte 0x80-0xFE: indexed fields of index 0-126 (0x80, index 0, is refused by the library's decoding and
# so never kept; 0xFF would start a multi-byte index).
_ONE_BYTE_INDEXED: Final = bytes(range(0x80, 0xFF))
_MEMO_SIZE: Final = 64  # blocks kept; emptied when full (a client varies its requests: decoding goes on as before)


class MemoDecoder(Decoder):
    """The library's HPACK decoder, remembering the blocks of indexed fields it decoded (see the module's doc)."""

    def __init__(self) -> None:
        self._memo: dict[bytes, list[Any]] = {}
        super().__init__()

    def decode(self, data: bytes, raw: bool = False) -> list[Any]:
        memo = self._memo
        fields = memo.get(data)
        if fields is not None:
            return list(fields)
        if data.translate(None, _ONE_BYTE_INDEXED):
            memo.clear()  # this block may change the dynamic table: what the memo says may no longer hold
            return list(super().decode(data, raw))
        fields = list(super().decode(data, raw))
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        memo[data] = fields
        return list(fields)

    # The limits a decoding is checked against: a change empties the memo, so the next block is checked anew.
    @property
    def max_header_list_size(self) -> int:
        return self._max_header_list_size

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        self._memo.clear()
        self._max_header_list_size = value

    @property
    def max_allowed_table_size(self) -> int:
        return self._max_allowed_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self._memo.clear()
        self._max_allowed_table_size = value

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._memo.clear()
        self.header_table.maxsize = value


def _integer(value: int, prefix_bits: int, flags: int = 0) -> bytes:
    """RFC 7541 §5.1: an integer with an N-bit prefix, `flags` in the first byte's other bits."""
    if value < (1 << prefix_bits) - 1:
        return bytes((flags | value,))
    encoded = encode_integer(value, prefix_bits)
    encoded[0] |= flags
    return bytes(encoded)


class PlainEncoder(Encoder):
    """The library's HPACK encoder, literals without Huffman coding, indexed fields remembered (see the module's
    doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._indexed: dict[tuple[bytes, ...], bytes] = {}  # field -> its index, while the dynamic table holds

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        table = self.header_table
        indexed = self._indexed
        if table.resized:  # the size update goes first (the library writes it), and indices may have moved
            indexed.clear()
            return super().encode(headers, huffman=False)
        out = []
        for field in headers:  # h2 hands over (name, value) tuples of bytes, HeaderTuples among them
            encoded = indexed.get(field)
            if encoded is None:
                name, value = field[0], field[1]
                sensitive = not field.indexable if isinstance(field, HeaderTuple) else len(field) > 2 and field[2]
                found = table.search(name, value)
                if sensitive and (found is None or found[2] is None):
                    # Never indexed (RFC 7541 §6.2.3), the table untouched: as the library writes it, less its
                    # second search and its debug log (the request id of every answer comes this way).
                    head = b"\x10" + _integer(len(name), 7) + name if found is None else _integer(found[0], 4, 0x10)
                    out.append(head + _integer(len(value), 7) + value)
                    continue
                encoded = self.add((name, value), sensitive, False)
                if found is not None and found[2] is not None:
                    indexed[field] = encoded  # found whole: its index, however it is marked
                elif not sensitive:
                    indexed.clear()  # added to the table: the indices remembered moved
            out.append(encoded)
        return b"".join(out)
