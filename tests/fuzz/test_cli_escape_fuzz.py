"""Whatever a string holds, ``mesh`` prints no control character from it: through a table, a block
of fields, a plain line, an error, or ``--json`` (where it stays the same string once parsed)."""

from __future__ import annotations

import io
import json
import re

import orjson
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from mesh.ops.console import Column, Listing, emit_json
from mesh.ops.escape import install
from tests.fuzz.strategies import SCALE

#: What a terminal acts on: C0 but newline (tabs rich expands to spaces), DEL, C1, bidi controls.
ACTS = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")

#: Text heavy with what terminals act on, mixed with ordinary characters.
hostile = st.lists(st.one_of(st.sampled_from(["\x1b", "[", "]", "31m", "\x07", "\x9b", "\r", "\x08", "\u202e",
                                               "\u2066", "\x00", "\x7f", ";", "0", "\n", "\t"]),
                             st.characters()), max_size=40).map("".join)


def printed(*renderables: object, width: int) -> str:
    """What a console like ``mesh``'s prints, as a terminal would get it (no colour codes of its own)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=True, color_system=None, soft_wrap=True)
    install([console])
    for renderable in renderables:
        console.print(renderable)
    return buffer.getvalue()


@hsettings(max_examples=150 * SCALE)
@given(rows=st.lists(st.tuples(hostile, hostile, hostile), min_size=1, max_size=4),
       width=st.sampled_from([30, 80, 200]), wide=st.booleans())
def test_no_control_character_from_data_reaches_the_terminal_through_a_listing(rows, width, wide):
    columns = [Column("id", key=True), Column("state"), Column("error", wrap=True)]
    listing = Listing(columns, [(Text(a), b, c) for a, b, c in rows], wide=wide)
    shown = printed(listing, width=width)
    assert not ACTS.search(shown), repr(shown)


@hsettings(max_examples=150 * SCALE)
@given(value=hostile)
def test_no_control_character_reaches_it_through_a_field_or_a_styled_line(value):
    shown = printed(Text(f"key:       {value}"), f"agent {value}", Text.assemble("job ", (value, "bold")),
                    width=80)
    assert not ACTS.search(shown), repr(shown)


@hsettings(max_examples=150 * SCALE)
@given(value=st.recursive(hostile, lambda inner: st.dictionaries(hostile, inner, max_size=3) |
                          st.lists(inner, max_size=3), max_leaves=8))
def test_json_output_carries_no_raw_control_character_and_parses_back_to_the_same_value(value, capsys):
    emit_json({"v": value})
    text = capsys.readouterr().out
    assert not ACTS.search(text.replace("\n", "")), repr(text)
    assert json.loads(text) == {"v": value} == orjson.loads(text)
