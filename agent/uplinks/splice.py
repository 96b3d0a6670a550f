"""Same-family batches cut from the stored bytes: no parse, no re-encode, no Row per event.

A fetch (``spool.types.Queued``) holds whole runs of records. While its leading runs
are in the uplink's own family and can go as stored, the batch is cut from them with
slices, sums and set operations, per run and not per event. Nucleus runs can go as
stored when their record holds the ids ingest read (records.ZSTD_IDS). An event without
an id is sent with its seq as id, put last in its stored bytes (what the take loop's
re-encoding gives, byte for byte) unless the body holds `"id":null` anywhere. Segment bodies go as
stored (segment_http splices `sentAt` in); whether each is a JSON object is checked
for the whole batch at once.

Anything else is left to ``prepare.take_prefix``, one row at a time (it converts the
other family, and refuses what can never be sent): this returns None when it cannot
take even the first event, and stops early where the take loop would have to decide.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate, chain, repeat
from operator import add, itemgetter
from typing import Any

from agent.families.event import NUCLEUS
from agent.spool.types import Queued, Row, joined
from agent.uplinks.prepare import Encoder, Prepared, escaped_extra


def take(uplink: Encoder, rows: Sequence[Row],
         in_flight: dict[Any, int] | tuple[()] | None = None) -> Prepared | None:
    """The next batch spliced from ``rows``' runs, or None for the take loop to make.

    ``in_flight`` as for take_prefix: given, ack ids are event ids, unique within the
    batch and among those in flight (a tuple: none are in flight).
    """
    if not isinstance(rows, Queued):
        return None
    cfg, family = uplink.cfg, uplink.family
    keyed = family == NUCLEUS
    overhead = uplink.event_overhead
    budget = cfg.batch_bytes - uplink.envelope_bytes
    most = None if uplink.limit is None else uplink.limit.max_bytes
    busy = in_flight if isinstance(in_flight, dict) else None
    room = cfg.batch_max_events
    spans: list[range] = []   # each run's seqs taken
    bodies: list[bytes] = []
    ids: list[Any] = []
    seen: set[Any] = set()
    sized = True   # every run's shortest body is known to be long enough for an object
    for run in rows.runs:
        if not room or run.family != family or (keyed and run.ids is None):
            break
        part = run.bodies if len(run.bodies) <= room else run.bodies[:room]
        keys = run.ids
        types: set[type] = set()
        if keyed and keys is not None:
            keys = keys if len(keys) <= room else keys[:room]
            # The ids' types, once a run: whether any is None (`None in keys` compared
            # each int to None the slow way, by == both ways) and below, whether any is a
            # string (of ids up to the byte cap: one cut off may say yes, and _fresh decides).
            types = set(map(type, keys))
            if _NONE in types:
                part, keys = _seq_ids(part, keys, run.first, len(types) == 1)
                if not part:
                    break
        k = len(part)
        # The read's sum for a whole run; not a join: it would copy every body.
        size = run.nbytes if part is run.bodies and run.nbytes is not None \
            else sum(map(len, part))
        spent = size + overhead * k
        # Summed first: no event is over the limit when all of them are not; nor when
        # the run's record holds none longer (a max of every len cost 5% of a drain).
        if most is not None and spent > most \
                and (run.longest is None or run.longest > most) and max(map(len, part)) > most:
            break  # the take loop refuses it
        if spent > budget:  # else no event alone can be over the budget either
            # What each event adds to the request, summed: the byte cap by one bisect.
            costs = list(accumulate(map(add, map(len, part), repeat(overhead))))
            k = bisect_right(costs, budget)
            if not k:
                break
            part, spent = part[:k], costs[k - 1]
        if keyed:
            assert keys is not None
            keys = keys[:k]
            new = set(keys)
            if in_flight is not None and (
                    len(new) != k or not seen.isdisjoint(new)
                    or (busy is not None and not busy.keys().isdisjoint(new))
                    or str in types):
                # Cut before the first id the take loop would stop at, or weigh (a string
                # not all ASCII: prepare.escaped_extra): a module's ids are small numbers
                # and repeat (1..10000), so most runs hold one.
                k = _fresh(keys, seen, busy)
                if not k:
                    break
                keys, part = keys[:k], part[:k]
                new = set(keys)
                spent = sum(map(len, part)) + overhead * k
            if in_flight is not None:
                if seen:
                    seen |= new
                else:
                    seen = new  # the first run's set as it is: no copy
            ids += keys
        spans.append(range(run.first, run.first + k))
        bodies += part
        sized = sized and run.shortest is not None and run.shortest >= _SHORTEST
        budget -= spent
        room -= k
        if k < len(run.bodies):
            break
    if not spans or (not keyed and not objects(bodies, sized)):
        return None
    # Unkeyed (Segment), one range when the runs follow each other (a drain's usual
    # batch): no int made per event, and the ack settles it a record at a time
    # (spool/live.py). Keyed, a tuple: nucleus-ws walks a frame's seqs several times
    # (its reply matched against them), and a range made each int again each time.
    sent = tuple(chain.from_iterable(spans)) if keyed else joined(spans)
    return Prepared(rows[:len(sent)], sent, tuple(bodies), tuple(ids) if keyed else sent, (),
                    not keyed)


def _seq_ids(bodies: list[bytes], ids: list[Any], first: int, none: bool
             ) -> tuple[list[bytes], list[Any]]:
    """``bodies`` and ``ids`` (of seqs ``first``, ...), each event without an id given its
    seq as id, put last in its body: the bytes NucleusFraming.encode_stored makes by parsing
    and dumping it again (the stored body is ingest's compact_json, members in order).
    A stored id of None is a top-level `id` absent or null (ingest takes no other type):
    cut before the first body holding `"id":null` anywhere (maybe that member, which the
    take loop replaces in place), or not an object with members. ``none``: every id is
    None (events mapped from Segment at ingest have none), and when every body passes
    too, each is made at C speed (maps, no Python step per event: the loop below was a
    fifth of the event loop's time in a drain of such events). `"id":null` is looked for
    in the bodies joined, one scan: a match cannot span two of them, which meet at `}{`."""
    if none and objects(bodies) and _ID not in b"".join(bodies):
        seqs = range(first, first + len(bodies))
        return list(map(add, map(_HEAD, bodies), map(_ID_LAST.__mod__, seqs))), list(seqs)
    bodies, ids = list(bodies), list(ids)
    for i, ack_id in enumerate(ids):
        if ack_id is None:
            body = bodies[i]
            if _ID in body or len(body) < 3 or body[:1] != b"{" or body[-1:] != b"}":
                return bodies[:i], ids[:i]
            seq = first + i
            bodies[i] = b'%b,"id":%d}' % (body[:-1], seq)
            ids[i] = seq
    return bodies, ids


_ID = b'"id":null'
_ID_LAST = b',"id":%d}'
_NONE = type(None)


def _fresh(ids: Sequence[Any], seen: set[Any], busy: dict[Any, int] | None) -> int:
    """How many of ``ids`` lead without a repeat, one in ``seen`` or ``busy``, or one whose
    answer may take more than its bytes (escaped_extra: the take loop weighs it)."""
    fresh: set[Any] = set()
    for i, ack_id in enumerate(ids):
        if ack_id in fresh or ack_id in seen or (busy is not None and ack_id in busy) \
                or escaped_extra(ack_id):
            return i
        fresh.add(ack_id)
    return len(ids)


def objects(bodies: Sequence[bytes], sized: bool = False) -> bool:
    """Whether every body is a JSON object with members, as stored (`{`, more, `}`): by
    their first and last bytes, gathered at C speed (per-body checks cost more than the
    rest of a spliced batch) and counted: small ints, compared by identity (bytes() of them
    converted each back to a byte: 14% more instructions). With those
    bytes, only b"" and b"{}" are shorter than 3: two list scans by equality, cheaper than
    min(map(len, ...)), and skipped when ``sized`` says none is (the runs' shortest)."""
    n = len(bodies)
    return (n > 0 and (sized or (b"" not in bodies and b"{}" not in bodies))
            and list(map(_FIRST, bodies)).count(_OPEN) == n
            and list(map(_LAST, bodies)).count(_CLOSE) == n)


def stamped(bodies: Sequence[bytes], member: bytes, before: bytes, after: bytes) -> bytes:
    """``before``, then ``bodies`` (each passing ``objects``) with ``member`` (`"key":value`)
    put first in each, joined by commas, then ``after``: one slice per body and one join.
    The only copy of the whole is that join: a request body is a few hundred KB, and each
    ``+`` of it copied it again (with PYTHONMALLOC=malloc, 4x the join's time)."""
    head = b"{" + member + b","
    tails = list(map(_TAIL, bodies))
    # The ends on the first and last tails (a body's bytes copied once more), the commas
    # and member between by the join: no list of every part to fill.
    tails[0] = before + head + tails[0]
    tails[-1] += after
    return (b"," + head).join(tails)


_FIRST, _LAST, _TAIL = itemgetter(0), itemgetter(-1), itemgetter(slice(1, None))
_HEAD = itemgetter(slice(None, -1))
_OPEN, _CLOSE = ord("{"), ord("}")
_SHORTEST = len(b"{}") + 1   # bodies as long: none is b"" or b"{}" (see objects)
