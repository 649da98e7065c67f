"""Exactly-once writes at one server: a repeated write message gets its first outcome.

Every write message carries ``(client, seq, part)``: the client instance, its operation number and
the message's index among the operation's messages to this server. A client sends a message again
when its call failed in a way that may have come after the server applied it (the connection
dropped, the reply was lost), so the server remembers each applied message's reply and answers a
repeat with it, without applying it again. A repeat that arrives while the first is still being
applied waits for it. A message that failed (an invalid request) is not remembered: it changed
nothing, and a repeat fails the same way.

Replies are forgotten once the client reports, with a later operation, that every operation below
some number is acknowledged (``OpTag.done_below``), and in any case after ten minutes, longer than
any client keeps retrying.
"""

from __future__ import annotations

import threading
import time

__all__ = ["ReplyCache"]

Key = tuple[str, int, int]

_HORIZON = 600.0
_PENDING = object()


class ReplyCache:
    """Replies of applied write messages, by ``(client, seq, part)``. Thread safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._replies: dict[Key, object] = {}
        self._times: dict[Key, float] = {}
        self._done_below: dict[str, int] = {}
        self.repeats = 0

    def begin(self, key: Key, done_below: int, timeout: float = 60.0) -> bytes | None:
        """The remembered reply of ``key`` (a repeat), or None: the caller applies the message
        and then calls :meth:`finish` or :meth:`fail`. A repeat of a message still being applied
        waits up to ``timeout`` seconds for its outcome."""
        client, seq, _ = key
        with self._cond:
            self._prune(client, done_below)
            deadline = time.monotonic() + timeout
            while True:
                reply = self._replies.get(key)
                if reply is None:
                    self._replies[key] = _PENDING
                    self._times[key] = time.monotonic()
                    return None
                if reply is not _PENDING:
                    self.repeats += 1
                    return reply  # type: ignore[return-value]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"operation {seq} of client {client}: its first copy is "
                                       f"still being applied after {timeout:.0f} s")
                self._cond.wait(remaining)

    def finish(self, key: Key, reply: bytes) -> None:
        """``key`` was applied; remember its reply for repeats."""
        with self._cond:
            self._replies[key] = reply
            self._cond.notify_all()

    def fail(self, key: Key) -> None:
        """``key`` failed without changing anything; a repeat applies it afresh."""
        with self._cond:
            self._replies.pop(key, None)
            self._times.pop(key, None)
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._replies)

    def _prune(self, client: str, done_below: int) -> None:
        if done_below > self._done_below.get(client, 0):
            self._done_below[client] = done_below
            for key in [k for k in self._replies if k[0] == client and k[1] < done_below
                        and self._replies[k] is not _PENDING]:
                del self._replies[key]
                del self._times[key]
        if len(self._replies) > 4096:
            now = time.monotonic()
            for key in [k for k, t in self._times.items() if now - t > _HORIZON
                        and self._replies[k] is not _PENDING]:
                del self._replies[key]
                del self._times[key]
