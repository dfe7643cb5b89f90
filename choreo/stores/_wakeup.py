"""Wake-ups across processes for the SQLite store: a reader that waits for the log to grow
is woken as soon as any process appends to it, and takes no CPU meanwhile.

How it works:

- Readers wait on a condition, which writers of the same store notify after each commit
  (threads of one process need nothing more).
- For the other processes, a store whose readers wait binds a Unix datagram socket in a
  folder beside the database (`choreo.db-wake/<pid>-<random>`), and a thread of its own
  blocks on it. A writer whose transaction appended to the log sends one byte to every
  socket in that folder after its COMMIT; the thread that receives it notifies the
  condition.
- The socket is bound before a reader first looks at the log, and the byte is sent after
  the commit is visible, so no wake-up is lost: a commit that a reader did not see rings
  the socket.
- A waiting reader still looks at the log every `fallback` seconds (1 s by default), in
  case a writer is not choreo.
- The socket and its thread last while readers wait, and `LINGER` seconds more; a
  process that exits normally removes its socket.

Why this design:

- Sockets, not inotify on the `-wal` file. SQLite writes a transaction's frames to the WAL
  and fsyncs them before it publishes the commit in the shared-memory index. A reader woken
  by the write may look too early, miss the commit, and sleep until the fallback. A byte
  sent after COMMIT cannot arrive too early. Unix sockets are also in Python's standard
  library on Linux, macOS and the BSDs, where inotify would need ctypes and Linux.
- Datagrams. A writer never blocks on a reader: a full queue means wake-ups are already
  pending there. The kernel drops the queue of a process that dies.
- A thread per store, not a waiting reader blocking on the socket itself. Readers in one
  process then wait exactly as they would without other processes, and a commit wakes
  them at once, all together.

What can go wrong, and what happens then:

- A reader killed with `kill -9` leaves its socket file. A writer that gets "connection
  refused" from a socket file older than `STALE_AFTER` seconds removes it.
- A read-only store (`create=False`) binds nothing and creates nothing: it polls.
- Sometimes no socket can be bound: the folder is not writable, a file is in its way, the
  path is too long for a socket address on a system without `/proc/self/fd`, or the
  platform has no Unix datagram sockets (Windows). Then readers poll every `poll` seconds
  (10 ms by default) and try again after `RETRY_AFTER` seconds; the store works as before.
- A notification that fails never fails the commit it follows.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import secrets
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("choreo")

FALLBACK = 1.0
"""Seconds between looks at the log while wake-ups work."""
POLL = 0.01
"""Seconds between looks at the log when they do not."""
LINGER = 5.0
"""Seconds a store keeps its socket after its readers stopped waiting (5 to 10 s in fact)."""
STALE_AFTER = 5.0
"""A socket file that refuses a wake-up is removed once it is this many seconds old.

The grace covers a reader in the middle of `bind()`, whose file exists a moment before
its socket accepts anything."""
RETRY_AFTER = 30.0
"""Seconds of polling before a store that could not bind a socket tries again."""

SUFFIX = "-wake"
_NAME_LEN = 16  # "<pid>-<8 hex digits>", a pid having at most 7 digits
_MAX_ADDRESS = 107 if sys.platform.startswith("linux") else 103  # bytes in sockaddr_un.sun_path
_PROC_FD = sys.platform.startswith("linux") and os.path.isdir("/proc/self/fd")
_SUPPORTED = hasattr(socket, "AF_UNIX") and hasattr(select, "poll")


class Wakeup:
    """Wakes the readers of one database's log, in this process and in others."""

    def __init__(self, database: str, *, listen: bool = True, poll: float | None = None) -> None:
        self.folder = database + SUFFIX
        self.poll = POLL if poll is None else poll
        self.fallback = FALLBACK if poll is None else poll
        self.unavailable: str | None = None  # why readers poll instead, if they do
        if not listen:
            self.unavailable = "wake-ups are off for this store (it creates no socket)"
        elif not _SUPPORTED:
            self.unavailable = f"no Unix datagram sockets on {sys.platform}"
        self._retry_at = float("inf") if self.unavailable else 0.0
        self._logged = False
        self._changed = threading.Condition()
        self._generation = 0  # counts the commits noticed by this process
        self._waiting = 0  # calls of wait() under way
        self._idle_since = 0.0
        self._listener: _Listener | None = None

    # -- readers ---------------------------------------------------------------------
    def wait(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Return True as soon as `ready()` does, or False once `timeout` seconds have passed."""
        if timeout <= 0:
            return ready()
        deadline = time.monotonic() + timeout
        with self._changed:
            self._waiting += 1
            listening = self._listen()  # before the first look at the log: no commit after it goes unseen
        try:
            while True:
                with self._changed:
                    seen = self._generation
                if ready():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                with self._changed:
                    if self._generation == seen:
                        self._changed.wait(min(left, self.fallback if listening else self.poll))
                    if not listening and self._may_bind():
                        listening = self._listen()
        finally:
            with self._changed:
                self._waiting -= 1
                self._idle_since = time.monotonic()

    def _may_bind(self) -> bool:
        return self.unavailable is None or time.monotonic() >= self._retry_at

    def _listen(self) -> bool:
        """Make sure a thread listens on a socket for this store (hold `_changed`); whether one does."""
        listener = self._listener
        if listener is not None:
            if listener.pid == os.getpid():
                return True
            listener.sock.close()  # a copy inherited through fork(): its thread is not here
            self._listener = None
        if not self._may_bind():
            return False
        name = f"{os.getpid()}-{secrets.token_hex(4)}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        except OSError as e:
            self._failed(e)
            return False
        try:
            try:
                _bind(sock, self.folder, name)
            except FileNotFoundError:
                try:
                    os.mkdir(self.folder)  # the first reader ever creates the folder
                except FileExistsError:  # another process just did
                    pass
                _bind(sock, self.folder, name)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            self._failed(e)
            return False
        listener = _Listener(self, sock, name)
        try:
            listener.start()
        except RuntimeError as e:  # no thread can be started
            listener.close()
            self._failed(OSError(str(e)))
            return False
        self.unavailable = None
        self._listener = listener
        return True

    def _failed(self, e: OSError) -> None:
        self.unavailable = f"{self.folder}: {e.strerror or e}"
        self._retry_at = time.monotonic() + RETRY_AFTER
        log.log(logging.DEBUG if self._logged else logging.INFO,
                "no wake-ups across processes (%s): waiting readers look at the log every %gs",
                self.unavailable, self.poll)
        self._logged = True

    def _rung(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def _linger_over(self, listener: _Listener) -> bool:
        """Whether `listener` should stop (no reader waited for `LINGER` seconds); if so, forget it."""
        with self._changed:
            if self._waiting or time.monotonic() - self._idle_since < LINGER:
                return False
            if self._listener is listener:
                self._listener = None
            return True

    # -- writers ---------------------------------------------------------------------
    def notify(self, appended: bool = True) -> None:
        """Wake the readers after a COMMIT: this process's always, the others' if it `appended` to the log.

        Never raises. This process's readers are woken by every commit, as they were before
        there were sockets: with a thread per service in one process, benchmark 4's p50 was
        about 8 ms instead of 6 when only appends woke them (no wake-up was late: why, we
        did not find out).
        """
        self._rung()
        if not appended:
            return
        try:
            names = os.listdir(self.folder)
        except OSError:  # no folder: nobody ever waited (or it cannot be read: they poll)
            return
        listener = self._listener
        own = listener.socket_name if listener is not None else None  # this store's own socket
        names = [n for n in names if n != own]  # this store's readers are notified already
        if not names:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender, _addresses(self.folder) as address:
                sender.setblocking(False)
                for name in names:
                    try:
                        sender.sendto(b"\0", address(name))
                    except BlockingIOError:  # its queue is full: wake-ups are pending there already
                        pass
                    except ConnectionRefusedError:  # nobody is bound to it (any more)
                        _remove_if_stale(os.path.join(self.folder, name))
                    except (OSError, ValueError):  # gone meanwhile, not ours to write to, not a socket
                        pass
        except (OSError, ValueError) as e:
            log.debug("%s: could not ring the waiting readers: %s", self.folder, e)


class _Listener(threading.Thread):
    """The thread that blocks on a store's socket and wakes its readers when another store rang."""

    def __init__(self, wakeup: Wakeup, sock: socket.socket, name: str) -> None:
        super().__init__(name=f"choreo-wakeup-{name}", daemon=True)
        self.wakeup = wakeup
        self.sock = sock
        self.socket_name = name
        self.path = os.path.join(wakeup.folder, name)
        self.pid = os.getpid()
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)
        with _LISTENING_LOCK:
            _LISTENING.add(self)

    def run(self) -> None:
        try:
            while True:
                events = self._poller.poll(LINGER * 1000)
                if not events:
                    if self.wakeup._linger_over(self):
                        return
                elif events[0][1] & select.POLLIN:
                    self._drain()
                    self.wakeup._rung()
                else:
                    raise OSError(f"poll() reported {events[0][1]:#x}")
        except Exception as e:  # never an unhandled error in a thread: the readers poll
            log.warning("%s: wake-ups stopped (%s: %s): waiting readers look at the log every %gs",
                        self.path, type(e).__name__, e, self.wakeup.fallback)
            with self.wakeup._changed:
                if self.wakeup._listener is self:
                    self.wakeup._listener = None
        finally:
            self.close()

    def _drain(self) -> None:
        while True:
            try:
                self.sock.recv(16)
            except OSError:  # drained (BlockingIOError)
                return

    def close(self) -> None:
        with _LISTENING_LOCK:
            _LISTENING.discard(self)
        try:
            os.unlink(self.path)
        except OSError:
            pass  # removed already
        self.sock.close()


_LISTENING: set[_Listener] = set()
_LISTENING_LOCK = threading.Lock()


@atexit.register
def _remove_sockets() -> None:
    """At exit, remove this process's sockets (their threads are daemons, stopped without a word)."""
    with _LISTENING_LOCK:
        listeners = list(_LISTENING)
    for listener in listeners:
        if listener.pid == os.getpid():
            try:
                os.unlink(listener.path)
            except OSError:
                pass


def _bind(sock: socket.socket, folder: str, name: str) -> None:
    with _addresses(folder) as address:
        sock.bind(address(name))


@contextmanager
def _addresses(folder: str) -> Iterator[Callable[[str], str]]:
    """Yield how to address an entry of `folder` with a path short enough for a socket address.

    A long path is reached through `/proc/self/fd/N/`, N being the folder opened for the time.
    """
    if len(os.fsencode(folder)) + 1 + _NAME_LEN <= _MAX_ADDRESS:
        yield lambda name: os.path.join(folder, name)
        return
    if not _PROC_FD:
        raise OSError(errno.ENAMETOOLONG, "path too long for a socket address", folder)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        yield lambda name: f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def _remove_if_stale(path: str) -> None:
    """Remove a socket file that refused a wake-up, unless it is young (its reader may be binding it)."""
    try:
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and time.time() - info.st_mtime > STALE_AFTER:
            os.unlink(path)
    except OSError:
        pass
