"""HPACK for client connections: the memo of indexed-only blocks decodes exactly as the library does, whatever
the dynamic table went through, and keeps every limit; the encoder's literals go without Huffman coding."""

from __future__ import annotations

from typing import Any

import pytest
from hpack import Decoder, Encoder, HeaderTuple, InvalidTableSizeError, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError

from proxy.h2.codec import MemoDecoder, PlainEncoder

Fields = list[tuple[bytes, bytes]]
GET: Fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/a")]


def plain(fields: list[HeaderTuple]) -> Fields:
    return [(bytes(n), bytes(v)) for n, v in fields]


class TestMemoDecoder:
    """Blocks of indexed fields are remembered; anything that may change the table forgets them."""

    @pytest.mark.parametrize("requests", [
        [GET, GET, GET],
        [GET, [*GET[:3], (b":path", b"/b")], GET, GET],
        [GET, GET, [*GET, (b"x-new", b"1")], GET, [*GET, (b"x-new", b"1")], GET],
        [GET, GET] + [[*GET, (b"x-n", b"%d" % i)] for i in range(80)] + [GET, GET],
    ], ids=["same-request", "a-literal-between", "new-entries-shift-indices", "evictions"])
    def test_decodes_as_the_library_does(self, requests: list[Fields]) -> None:
        encoder, library, memo = Encoder(), Decoder(), MemoDecoder()
        encoder.header_table_size = library.header_table_size = memo.header_table_size = 1024
        for fields in requests:
            block = encoder.encode(fields)
            assert plain(memo.decode(block, raw=True)) == plain(list(library.decode(block, raw=True))) == fields

    def test_indices_pointing_elsewhere_after_a_table_change_are_decoded_anew(self) -> None:
        """The same indexed bytes mean other fields once an entry was added in front of the table."""
        encoder, memo = Encoder(), MemoDecoder()
        memo.decode(encoder.encode([(b"x-a", b"1")]), raw=True)
        indexed = encoder.encode([(b"x-a", b"1")])  # index 62: the newest entry
        assert plain(memo.decode(indexed, raw=True)) == [(b"x-a", b"1")]
        memo.decode(encoder.encode([(b"x-b", b"2")]), raw=True)
        assert plain(memo.decode(indexed, raw=True)) == [(b"x-b", b"2")]

    def test_each_answer_is_a_list_of_its_own(self) -> None:
        encoder, memo = Encoder(), MemoDecoder()
        memo.decode(encoder.encode(GET), raw=True)
        block = encoder.encode(GET)
        first = memo.decode(block, raw=True)
        first.clear()
        assert plain(memo.decode(block, raw=True)) == GET

    @pytest.mark.parametrize(("limit", "value", "error"), [
        ("max_header_list_size", 100, OversizedHeaderListError),
        ("max_allowed_table_size", 16, InvalidTableSizeError),
    ], ids=["header-list", "table"])
    def test_a_lower_limit_applies_to_a_block_seen_before(self, limit: str, value: int,
                                                          error: type[Exception]) -> None:
        """A limit lowered (SETTINGS_MAX_HEADER_LIST_SIZE, or SETTINGS_HEADER_TABLE_SIZE acknowledged): a block
        remembered under the old one is checked anew and refused."""
        encoder, memo = Encoder(), MemoDecoder()
        memo.decode(encoder.encode(GET), raw=True)
        block = encoder.encode(GET)
        memo.decode(block, raw=True)
        setattr(memo, limit, value)
        with pytest.raises(error):
            memo.decode(block, raw=True)

    @pytest.mark.parametrize("block", [b"\x80", b"\x82\x80", b"\xff\x7f", b"\xfe"],
                             ids=["index-zero", "index-zero-after-one", "huge-index", "index-beyond-the-table"])
    def test_invalid_blocks_are_refused_every_time(self, block: bytes) -> None:
        memo = MemoDecoder()
        for _ in range(2):
            with pytest.raises(HPACKDecodingError):
                memo.decode(block, raw=True)


ANSWER: Fields = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"content-length", b"2")]


class TestPlainEncoder:
    """Literals without Huffman coding; what the tables hold is indexed as before, byte for byte what the library
    writes without Huffman coding, whatever the dynamic table went through."""

    @pytest.mark.parametrize("answers", [
        [ANSWER, ANSWER, ANSWER],
        [ANSWER, [*ANSWER, NeverIndexedHeaderTuple(b"x-request-id", b"1")],
         [*ANSWER, NeverIndexedHeaderTuple(b"x-request-id", b"2")], ANSWER],
        [ANSWER, [(b"x-new", b"1"), *ANSWER], ANSWER, [(b"x-new", b"1"), (b"x-new", b"2"), *ANSWER], ANSWER],
        [ANSWER] + [[*ANSWER, (b"etag", b"%d" % i)] for i in range(100)] + [ANSWER, ANSWER],
        [ANSWER, [(b"x-secret", b"s", True), *ANSWER], [(b"x-secret", b"s", True), *ANSWER]],
        [ANSWER, [HeaderTuple(b"x-t", b"1"), *ANSWER], [(b"x-t", b"1"), *ANSWER], ANSWER],
        [[NeverIndexedHeaderTuple(b"authorization", b"secret"), NeverIndexedHeaderTuple(b"x-long", b"v" * 300)],
         [(b"x-t", b"1"), NeverIndexedHeaderTuple(b"x-t", b"2"), NeverIndexedHeaderTuple(b"x-t", b"1")],
         [NeverIndexedHeaderTuple(b"x-%d" % i, b"%d" % i) for i in range(40)] + [(b"x-t", b"1")],
         [NeverIndexedHeaderTuple(b"x-" + b"n" * 200, b"v")]],
    ], ids=["same-answer", "never-indexed-ids", "new-entries-shift-indices", "evictions", "sensitive-triples",
            "header-tuples", "never-indexed-names-static-dynamic-long"])
    def test_writes_what_the_library_writes(self, answers: list[list[Any]]) -> None:
        ours, library, decoder = PlainEncoder(), Encoder(), Decoder()
        for i, fields in enumerate(answers):
            if i == 2:
                ours.header_table_size = library.header_table_size = 2048  # a client's SETTINGS lowering it
            block = ours.encode(fields)
            assert block == library.encode(fields, huffman=False)
            assert plain(list(decoder.decode(block, raw=True))) == [(bytes(f[0]), bytes(f[1])) for f in fields]

    def test_literals_are_not_huffman_coded_and_decode_back(self) -> None:
        fields = [(b":status", b"200"), (b"content-type", b"text/plain"),
                  NeverIndexedHeaderTuple(b"x-request-id", b"0123abcd")]
        block = PlainEncoder().encode(fields)
        assert b"text/plain" in block and b"x-request-id" in block and b"0123abcd" in block
        assert plain(list(Decoder().decode(block, raw=True))) == [tuple(f) for f in fields]

    def test_repeated_fields_are_indexed(self) -> None:
        encoder = PlainEncoder()
        encoder.encode([(b":status", b"200"), (b"content-type", b"text/plain")])
        assert encoder.encode([(b":status", b"200"), (b"content-type", b"text/plain")]) == b"\x88\xbe"

    def test_never_indexed_fields_stay_out_of_the_table(self) -> None:
        encoder = PlainEncoder()
        encoder.encode([NeverIndexedHeaderTuple(b"x-request-id", b"1")])
        assert not encoder.header_table.dynamic_entries
