"""The reader of a large Nucleus message as it arrives (agent/dialects/nucleus_queue.py),
against the whole message parsed at once: however the message is cut into chunks, what it
keeps is the same, in order, within its bounds, and every event sharing the id of a kept
one is kept (modules drop every queued event whose id is acknowledged)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.dialects.body import BodyError
from agent.dialects.nucleus_queue import QueueReader, TooLarge
from agent.families.errors import Invalid

ids = st.one_of(st.integers(1, 6), st.sampled_from(["a", "b"]), st.just(2.5), st.none(),
                st.just(True), st.just([1]))
values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                                st.floats(allow_nan=False, allow_infinity=False), st.text()),
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
events = st.lists(st.one_of(st.fixed_dictionaries({"id": ids, "name": st.text(max_size=20),
                                                   "payload": values}), values), max_size=40)


def id_of(ev: Any) -> Any:
    """The id a module could be sent back for ``ev``, or None."""
    ev_id = ev.get("id") if isinstance(ev, dict) else None
    return ev_id if type(ev_id) in (int, float, str) else None


def read(raw: bytes, cuts: list[int], keep: int, most: int) -> Any:
    reader = QueueReader(keep, most, 10**9)
    start = 0
    for cut in sorted({c % (len(raw) + 1) for c in cuts}):
        reader.feed(raw[start:cut])
        start = cut
    reader.feed(raw[start:])
    return reader.finish()


@settings(max_examples=300, deadline=None)
@example(data=[10.0, {"id": 1}], cuts=[34], keep=50, extra=0, ascii_=False, spaced=True,
         before=True)   # a chunk ending in `10.`: read as 10 if not read again whole
@given(data=events, cuts=st.lists(st.integers(0, 10**6), max_size=30),
       keep=st.integers(50, 3000), extra=st.integers(0, 3000), ascii_=st.booleans(),
       spaced=st.booleans(), before=st.booleans())
def test_what_is_kept_does_not_depend_on_the_chunks(data: list[Any], cuts: list[int],
                                                    keep: int, extra: int, ascii_: bool,
                                                    spaced: bool, before: bool) -> None:
    msg = {"confirmation": "x", "data": data} if before else {"data": data, "z": [1, {}]}
    raw = json.dumps(msg, ensure_ascii=ascii_,
                     separators=(", ", ": ") if spaced else (",", ":")).encode()
    most = keep + extra
    try:
        whole = read(raw, [], keep, most)
    except TooLarge:
        with pytest.raises(TooLarge):
            read(raw, cuts, keep, most)
        return
    assert read(raw, cuts, keep, most) == whole
    kept = json.loads(whole.message)["data"]
    assert whole.total == len(data) and whole.kept == len(kept)
    assert len(whole.message) <= most + len('{"data":[]}')
    # In their order: ``kept`` is a subsequence of ``data``.
    rest = iter(data)
    assert all(any(ev == other for other in rest) for ev in kept)
    shared = {ev_id for ev in kept if (ev_id := id_of(ev)) is not None}
    assert all(ev in kept for ev in data if (ev_id := id_of(ev)) is not None
               and ev_id in shared)
    if data:
        assert kept, "each message keeps something"


@pytest.mark.parametrize("raw,error", [
    (b'{"data":[1,', BodyError), (b'{"data":[1]}x', BodyError), (b'{"data":[1] "a"}', BodyError),
    (b'{"data":[1],"data":[2]}', BodyError), (b'{"data":[tru]}', BodyError),
    (b'{"data":[1e]}', BodyError), (b'\xff{"data":[]}', BodyError), (b"", BodyError),
    (b'{"data":[' + b"[" * 5000 + b"]" * 5000 + b"]}", BodyError),
    (b"[1,2]", Invalid), (b'{"data":{}}', Invalid), (b'{"a":1}', Invalid)])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_a_message_that_is_not_json_or_has_no_data_array_is_refused(
        raw: bytes, error: type[Exception], chunk: int) -> None:
    with pytest.raises(error):
        read(raw, list(range(chunk, len(raw), chunk)), 1000, 1000)
