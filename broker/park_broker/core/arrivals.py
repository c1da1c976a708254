"""The order in which one client's batches of submissions are decided.

A client may keep several `SubmitMany` batches in flight, so that the broker
admits batch n + 1 while the commit of batch n is being written. Calls on one
connection can overtake each other (HTTP/2 interleaves their frames, and
handlers run as separate tasks), yet a later batch may name jobs of an earlier
one, which must be decided first. So a client numbers its batches
(`SubmitManyRequest.stream`, `number`, `after`), and `Arrivals` holds each batch
until the one it names in `after` is decided.

Guarantees:
- A batch whose `after` has arrived is decided only after it, however long
  that one takes (a package install, a slow read).
- A batch whose `after` has not arrived within `ARRIVAL_WAIT` seconds goes on
  without it, as an unnumbered batch does: a predecessor lost with a broker
  that restarted, or one the client gave up on, never blocks a stream forever.
  Jobs that name the missing batch's jobs are then refused NOT_FOUND, which is
  what they would have been without ordering.
- Streams are per owner: no user can hold up another's batches, whatever
  stream id they send. At most `MAX_STREAMS` idle streams are remembered.

It never touches the ledger or the store; `Submissions` tells it when a batch is
decided (its changes in the store's line).
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from park_broker.errors import Code, fail

ARRIVAL_WAIT = 10.0      # seconds a batch waits for the batch it follows to arrive
MAX_STREAMS = 4096       # idle streams remembered (their last decided number)
MAX_STREAM_NAME = 64     # bytes: a client names its stream with 16 random ones


@dataclass(slots=True)
class _Stream:
    decided: int = 0                                              # the highest number decided
    arrived: dict[int, asyncio.Event] = field(default_factory=dict)   # number -> set once it is decided
    waiting: dict[int, asyncio.Event] = field(default_factory=dict)   # number not yet arrived -> set on arrival


class Turn:
    """One batch's place in its stream: `wait` until it may be decided, `decided` once it is (idempotent)."""

    def __init__(self, arrivals: Arrivals | None, key: tuple[str, bytes], number: int, after: int):
        self._arrivals = arrivals
        self._key = key
        self._number = number
        self._after = after
        self._done = False

    async def wait(self) -> None:
        if self._arrivals is not None and self._after:
            await self._arrivals._predecessor(self._key, self._after)

    def decided(self) -> None:
        if not self._done:
            self._done = True
            if self._arrivals is not None:
                self._arrivals._decided(self._key, self._number)


UNORDERED = Turn(None, ("", b""), 0, 0)   # a batch that names no place in a stream (one in flight, or a tool)


class Arrivals:
    def __init__(self) -> None:
        self._streams: OrderedDict[tuple[str, bytes], _Stream] = OrderedDict()

    def arrive(self, owner: str, stream: bytes, number: int, after: int) -> Turn:
        """The turn of batch `number` of `owner`'s `stream`, which follows batch `after` (0: none);
        INVALID_ARGUMENT for a stream name longer than MAX_STREAM_NAME (every name is kept a while)."""
        if len(stream) > MAX_STREAM_NAME:
            fail(Code.INVALID_ARGUMENT, f"a batch's stream is named by at most {MAX_STREAM_NAME} bytes "
                                        f"(park clients send 16 random ones); got {len(stream)}")
        if not stream or not number:
            return UNORDERED
        key = (owner, stream)
        entry = self._stream(key)
        entry.arrived.setdefault(number, asyncio.Event())
        arrival = entry.waiting.pop(number, None)
        if arrival is not None:
            arrival.set()
        return Turn(self, key, number, after if after < number else 0)

    async def _predecessor(self, key: tuple[str, bytes], after: int) -> None:
        entry = self._stream(key)
        if after not in entry.arrived and after > entry.decided:
            arrival = entry.waiting.setdefault(after, asyncio.Event())
            try:
                await asyncio.wait_for(arrival.wait(), ARRIVAL_WAIT)
            except TimeoutError:
                return   # lost or given up: go on without it (see the module docstring)
            finally:
                entry.waiting.pop(after, None)
        done = entry.arrived.get(after)
        if done is not None:
            await done.wait()

    def _decided(self, key: tuple[str, bytes], number: int) -> None:
        entry = self._stream(key)
        entry.decided = max(entry.decided, number)
        done = entry.arrived.pop(number, None)
        if done is not None:
            done.set()

    def _stream(self, key: tuple[str, bytes]) -> _Stream:
        entry = self._streams.get(key)
        if entry is None:
            entry = self._streams[key] = _Stream()
            while len(self._streams) > MAX_STREAMS:
                oldest, idle = next(iter(self._streams.items()))
                if idle.arrived or idle.waiting:
                    break   # batches are in flight on it: kept, at the cost of a few more entries
                del self._streams[oldest]
        else:
            self._streams.move_to_end(key)
        return entry
