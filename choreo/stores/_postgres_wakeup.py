"""Wake-ups for the PostgreSQL store (see `choreo.stores.postgres`, which owns one `Wakeups`).

- A transaction that appends to the log notifies the channel `choreo_log` at COMMIT, with
  `<first position>:<last position>:<flags>:<schema>` as payload, then the types it appended,
  one a line (`*` if there are too many); flags `f`: one has the failed outcome, `o`: one has
  an outcome.
- A store whose readers wait LISTENs on one dedicated connection, held by a thread
  (`_Listener`) that wakes them at once. The payload tells them the log grew past their
  position, so they need not ask. A notification from another schema's log is ignored; one
  that choreo did not send makes them look.
- A commit in this process wakes this process's readers directly.
- A reader with an interest that has looked at the whole log while the current connection
  listened skips, without asking the server, what the notifications since say it does not
  want (the positions are gap-free, so notified ranges that follow each other up to the end
  of the log cover every event since). Most commits concern one service: the others are not
  sent a query each.
- A reader looks at the log when it starts waiting, unless the log was last seen ending
  where it waits from by a read that began while the current connection listened (every
  commit since has notified that connection). Then it looks only every `poll_interval`
  seconds (1 s by default), in case a notification was lost. While no connection listens
  (the server restarted) it looks every 10 ms (or `poll_interval`) and tries to listen
  again every second.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from choreo.store import Interest

import psycopg

if TYPE_CHECKING:
    from choreo.stores.postgres import PostgresStore

FALLBACK = 1.0
"""Seconds between looks at the log while a reader waits and notifications work."""
POLL = 0.01
"""Seconds between looks at the log while they do not (the listening connection broke)."""
RETRY_AFTER = 1.0
"""Seconds before a store that could not listen tries again."""
RANGES = 10_000
"""How many notified appends a store remembers for its readers to skip by."""


class Wakeups:
    """Where the log is known to end, and the readers of one store waiting for it to grow."""

    def __init__(self, store: PostgresStore, *, poll_interval: float | None, name: str) -> None:
        self._connect: Callable[[], psycopg.Connection[Any]] = lambda: store._connect(listen=True)
        self._last_position = store.last_position
        self.poll_interval = poll_interval
        self.name = name
        self._changed = threading.Condition()
        self._generation = 0  # counts the commits and notifications noticed by this process
        self._listener: _Listener | None = None
        self._retry_at = 0.0
        self._closed = False
        self._head = 0  # where the log is known to end (committed), from reads, commits and notifications
        self._head_epoch = 0  # the listening connection under which the log was seen ending at _head
        self._epochs = 0  # listening connections started so far
        self._schema = ""  # the schema of the log (its notifications name it)
        self._unsure = False  # a notification came that says nothing of where the log ends
        # what the notifications under the current listening connection said: (first, last, flags, types or None)
        self._ranges: deque[tuple[int, int, str, frozenset[str] | None]] = deque(maxlen=RANGES)

    def epoch(self) -> int:
        """The number of the listening connection if one listens now (0 if none): a commit after now notifies it."""
        listener = self._listener
        return listener.epoch if listener is not None and listener.is_alive() else 0

    def seen(self, head: int, epoch: int) -> None:
        """Remember that a look at the log that began under listener `epoch` found it ending at `head`."""
        with self._changed:
            if head >= self._head:
                self._head, self._head_epoch = head, epoch

    def rung(self, head: int = 0, epoch: int = 0) -> None:
        """Wake the waiting readers; `head`, if known, is where the log now ends."""
        with self._changed:
            if head > self._head:
                self._head, self._head_epoch = head, epoch
            self._generation += 1
            self._changed.notify_all()

    def noticed(self, payload: str, epoch: int) -> None:
        """A notification on the channel, received by listener `epoch` (see the module's docstring)."""
        header, _, lines = payload.partition("\n")
        parts = header.split(":", 3)
        if len(parts) < 4 or not (parts[0].isdigit() and parts[1].isdigit()):  # not choreo's: look at the log
            with self._changed:
                self._unsure = True
            self.rung()
            return
        first, last, flags, schema = int(parts[0]), int(parts[1]), parts[2], parts[3]
        if schema != self._schema:
            return  # another schema's log
        types = None if lines == "*" else frozenset(lines.split("\n"))
        with self._changed:
            if epoch == self._epochs:
                self._ranges.append((first, last, flags, types))
        self.rung(last, epoch)

    def unwanted_until(self, position: int, interest: Interest) -> int | None:
        """Where a reader at `position` may skip to, if the notifications since say that nothing up to the
        end of the log is wanted; None if they do not (the reader asks the server).

        Only for a reader that last reached the end of the log by a look that began while the current
        connection listened: every commit since then has notified it.
        """
        with self._changed:
            head = self._head
            ranges = sorted(r for r in self._ranges if r[1] > position)
        at = position
        for first, last, flags, types in ranges:
            if first != at + 1 or types is None or _wants(interest, types, flags):
                return None
            at = last
        return at if at == head else None

    def _listen(self) -> bool:
        """Make sure a connection LISTENs for the readers; whether one does."""
        with self._changed:
            if self._listener is not None and self._listener.is_alive():
                return True
            if time.monotonic() < self._retry_at or self._closed:
                return False
        try:
            conn = self._connect()  # LISTEN before the reader's first look: no commit goes unseen
            try:
                row = conn.execute("SELECT current_schema()").fetchone()
            except BaseException:
                conn.close()
                raise
        except Exception:
            with self._changed:
                self._retry_at = time.monotonic() + RETRY_AFTER
            return False
        with self._changed:
            if self._closed or (self._listener is not None and self._listener.is_alive()):  # another thread won
                conn.close()
                return not self._closed
            self._schema = str(row[0]) if row else ""
            self._epochs += 1
            self._ranges.clear()
            self._listener = _Listener(self, conn, self._epochs)
            self._listener.start()
        return True

    def wait(self, after: int, timeout: float) -> bool:
        """Block until the log has an event after `after`, or `timeout` seconds pass."""
        if self._head > after:  # known committed
            return True
        if timeout <= 0:
            return self._last_position() > after
        deadline = time.monotonic() + timeout
        listening = self._listen()
        fallback = self.poll_interval or FALLBACK
        # no need to look if the log was last seen ending (at `after` or before) while this connection
        # listened: every commit since has notified it
        look = not (listening and self._head_epoch and self._head_epoch == self.epoch())
        while True:
            with self._changed:
                seen = self._generation
                look = look or self._unsure
                self._unsure = False
            if self._head > after or (look and self._last_position() > after):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._changed:
                look = False
                if self._generation == seen:
                    look = not self._changed.wait(min(left, fallback if listening else (self.poll_interval or POLL)))
            if not listening or self._listener is None:
                listening = self._listen()
                look = True

    def _stopped(self, listener: _Listener) -> None:
        """`listener`'s connection is gone: forget it, and wake the readers (they listen again, or poll)."""
        with self._changed:
            if self._listener is listener:
                self._listener = None
        self.rung()

    def close(self) -> None:
        """Stop listening (the thread closes its connection within half a second)."""
        with self._changed:
            self._closed = True
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()


class _Listener(threading.Thread):
    """The thread that holds a store's LISTEN connection and wakes its readers on each notification."""

    def __init__(self, wakeups: Wakeups, conn: psycopg.Connection[Any], epoch: int) -> None:
        super().__init__(name=f"choreo-pg-listen-{wakeups.name}", daemon=True)
        self.wakeups = wakeups
        self.conn = conn
        self.epoch = epoch
        self._stop = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop.is_set():
                for note in self.conn.notifies(timeout=0.5):
                    self.wakeups.noticed(note.payload, self.epoch)
        except psycopg.Error:  # the connection broke (the server restarted): readers poll, then listen again
            pass
        finally:
            self.conn.close()
            self.wakeups._stopped(self)

    def stop(self) -> None:
        self._stop.set()


def _wants(interest: Interest, types: frozenset[str], flags: str) -> bool:
    """Whether `interest` wants any of a batch of events with these types and outcome flags."""
    return ((interest.failures and "f" in flags) or (interest.outcomes and "o" in flags)
            or any(t in interest.types or (interest.known is not None and t not in interest.known) for t in types))
