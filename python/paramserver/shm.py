"""Shared-memory transport between a worker and a server on the same host.

gRPC over loopback copies a payload four to five times and runs it through the kernel's TCP stack
(about 20 ms of CPU per 16 MB each way, docs/operations.md). Between two processes of one host the
payload can instead sit in memory both map: the worker writes a serialized DataRequest into a
shared segment, a tiny gRPC call (:class:`ShmExchangeRequest`) tells the server where it is, and
the server reads it in place and writes its DataReply into the same segment. The messages are
byte for byte those of the gRPC path (paramserver.wire), and the small call still carries the job
token, the deadline, the error status and, inside the request, the exactly-once operation ids: only
the bytes travel differently.

Negotiation (per server, when a worker first sends to it): the worker creates a segment and asks
the server to map it (:class:`ShmAttachRequest`, with the worker's boot id and pid). The server
accepts when it is willing (``--transport auto``), the boot ids agree (same host), it can see the
worker's process (same pid namespace) and it can open the segment (same ``/dev/shm``, same user).
Otherwise it says why and the worker uses gRPC for that server, silently.

Lifetime: a segment is created with mode 0600 under an unguessable name
(``paramserver-<pid>-<32 hex digits>``), and the worker unlinks it as soon as the server has
mapped it (or refused), so it exists only in the two processes' memory and nothing is left in
``/dev/shm`` when either is killed. The window between creating and unlinking is closed by
:func:`sweep`, which removes the segments of dead processes and runs when a launcher, a server or
a client starts. A server unmaps a worker's segments when the worker detaches (``close()``), when
its process ends (checked every second), and when it stops.

No reader sees a half-written segment: one call uses a segment at a time; the worker writes the
request before the call and reads the reply only after the call returned, and the server writes the
reply before returning. A segment whose call ended abnormally (deadline, cancellation, lost
connection: the server may still be using it) is never used again.
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc

from paramserver.errors import ParamServerError
from paramserver.v1 import paramserver_pb2 as pb

__all__ = ["SHM_DIR", "PREFIX", "boot_id", "sweep", "owner", "alive", "Segment", "ShmLink",
           "ShmRegistry", "ShmCall", "UnknownSegment", "release", "write_parts", "janitor",
           "unknown_metadata"]

SHM_DIR = "/dev/shm"
PREFIX = "paramserver-"
_NAME = re.compile(r"^paramserver-(\d+)-[0-9a-f]{32}$")
#: Trailing metadata marking "this segment is unknown here" (the server restarted): the worker
#: attaches again and sends the message once more (it was not processed).
_UNKNOWN_KEY = "ps-shm"
#: Smallest segment, and the rounding of segment sizes.
_MIN_SEGMENT = 1 << 20
#: Segments a link keeps for reuse; more in flight at once are unmapped when they come back.
_KEEP = 16


def boot_id() -> str:
    """This host's boot id (the same for every process of one running kernel)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat), "" if it is not visible.
    With the pid it names one process for good (a pid can be reused, the pair cannot)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = data[data.rfind(b")") + 2:].split()
    return fields[19].decode() if len(fields) > 19 else ""


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, waiting to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X")
    except OSError:
        return True


def owner(name: str) -> int:
    """The pid that created segment ``name`` (0 if it is not a segment's name)."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else 0


def sweep(directory: str = SHM_DIR) -> list[str]:
    """Remove the segments in ``directory`` left by processes that are gone (killed between
    creating a segment and unlinking it); return their names. Segments of live processes stay."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match is None or alive(int(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


class Segment:
    """One mapped shared-memory segment (``view``: its bytes, writable)."""

    def __init__(self, name: str, mapping: mmap.mmap) -> None:
        self.name = name
        self.size = len(mapping)
        self._mapping = mapping
        self.view = memoryview(mapping)

    @classmethod
    def create(cls, size: int, directory: str = SHM_DIR) -> Segment:
        """A new segment of at least ``size`` bytes (rounded up to 1 MiB), mode 0600, under a
        fresh unguessable name; still linked (see :meth:`unlink`). OSError if it cannot be."""
        size = max(_MIN_SEGMENT, -(-size // _MIN_SEGMENT) * _MIN_SEGMENT)
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return cls(name, mapping)

    @classmethod
    def attach(cls, name: str, size: int, directory: str = SHM_DIR) -> Segment:
        """Map the segment ``name`` another process created. ValueError if the name is not a
        segment's, or the file is not a private regular file of this user of ``size`` bytes;
        OSError if it cannot be opened."""
        if not isinstance(name, str) or _NAME.match(name) is None:
            raise ValueError(f"{name!r} is not a paramserver segment name")
        fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() \
                    or info.st_mode & 0o077:
                raise ValueError(f"segment {name} is not a private file of this user")
            if info.st_size != size or size <= 0:
                raise ValueError(f"segment {name} has {info.st_size} bytes, not {size}")
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, mapping)

    def unlink(self, directory: str = SHM_DIR) -> None:
        """Remove the name (the memory stays mapped by whoever mapped it)."""
        try:
            os.unlink(os.path.join(directory, self.name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap now if no view of it is left, else when the last one goes."""
        self.view.release()
        try:
            self._mapping.close()
        except BufferError:
            pass  # a view still exists: the mapping goes with it


def write_parts(view: memoryview, parts: list[Any]) -> int:
    """Copy ``parts`` (bytes, numpy arrays) one after the other into ``view``; the bytes written."""
    pos = 0
    for part in parts:
        raw = part if isinstance(part, bytes) else memoryview(part).cast("B")
        n = len(raw)
        view[pos:pos + n] = raw
        pos += n
    return pos


class UnknownSegment(ParamServerError):
    """The server does not know the segment (it restarted): attach again."""


# -- the worker's side ------------------------------------------------------------------------------

@dataclass
class _Slot:
    segment: Segment
    handle: int


class ShmLink:
    """A worker's shared-memory link to one server: its segments, reused call after call.

    Args:
        stub: the server's ParameterServer stub (on the route's channel).
        client: the worker's client id.
        address: the server's address (for messages).
    """

    def __init__(self, stub: Any, client: str, address: str) -> None:
        self._stub = stub
        self._client = client
        self.address = address
        self._lock = threading.Lock()
        self._free: list[_Slot] = []
        self._handles: set[int] = set()  # every segment of this link the server maps
        self._detaching: list[Any] = []  # detach calls in flight (kept until done)
        self._closed = False

    @classmethod
    def negotiate(cls, stub: Any, client: str, address: str,
                  timeout: float) -> tuple[ShmLink | None, str]:
        """Attach a first segment to the server: ``(link, "")``, or ``(None, why not)``.
        Raises grpc.RpcError when the server cannot be reached."""
        link = cls(stub, client, address)
        try:
            slot = link._attach(_MIN_SEGMENT, timeout)
        except _Refused as exc:
            return None, str(exc)
        link._free.append(slot)
        return link, ""

    def _attach(self, size: int, timeout: float) -> _Slot:
        try:
            segment = Segment.create(size)
        except OSError as exc:
            raise _Refused(f"cannot create a segment in {SHM_DIR}: {exc}") from None
        try:
            reply = self._stub.ShmAttach(pb.ShmAttachRequest(
                client=self._client, boot_id=boot_id(), pid=os.getpid(), name=segment.name,
                size=segment.size), timeout=timeout)
        except BaseException:
            segment.close()
            raise
        finally:
            segment.unlink()
        if not reply.accepted:
            segment.close()
            raise _Refused(reply.reason)
        with self._lock:
            self._handles.add(reply.segment)
        return _Slot(segment, reply.segment)

    def start(self, parts: list[Any], size: int, reply_room: int, timeout: float,
              wait: bool = False) -> ShmCall:
        """Write one serialized DataRequest (``parts``, ``size`` bytes) into a free segment and
        start its exchange (with ``wait``, make it before returning: no thread per call);
        :meth:`ShmCall.result` gives the serialized DataReply."""
        reply_offset = -(-size // 64) * 64
        slot = self._take(reply_offset + reply_room, timeout)
        try:
            write_parts(slot.segment.view, parts)
            request = pb.ShmExchangeRequest(
                segment=slot.handle, request_size=size, reply_offset=reply_offset,
                reply_capacity=slot.segment.size - reply_offset)
            if not wait:
                return ShmCall(self, slot, reply_offset,
                               self._stub.ShmExchange.future(request, timeout=timeout))
        except BaseException:
            self._give_back(slot, True)  # the server never saw it
            raise
        try:
            answer: Any = self._stub.ShmExchange(request, timeout=timeout)
        except grpc.RpcError as error:
            answer = error
        return ShmCall(self, slot, reply_offset, _Done(answer))

    def call(self, parts: list[Any], size: int, reply_room: int, timeout: float,
             leases: list | None = None) -> bytes | memoryview:
        """:meth:`start` with ``wait``, then the reply (see :meth:`ShmCall.result`)."""
        return self.start(parts, size, reply_room, timeout, wait=True).result(leases)

    def _take(self, need: int, timeout: float) -> _Slot:
        with self._lock:
            for i, slot in enumerate(self._free):
                if slot.segment.size >= need:
                    return self._free.pop(i)
        return self._attach(need, timeout)

    def _give_back(self, slot: _Slot, ok: bool) -> None:
        with self._lock:
            if ok and not self._closed and len(self._free) < _KEEP:
                self._free.append(slot)
                return
            self._handles.discard(slot.handle)
            closed = self._closed
            self._detaching = [f for f in self._detaching if not f.done()]
        slot.segment.close()
        if not closed:
            # The server unmaps it too (if a call still uses it, once that call ends).
            call = self._stub.ShmDetach.future(pb.ShmDetachRequest(
                client=self._client, segments=[slot.handle]), timeout=5.0)
            with self._lock:
                self._detaching.append(call)

    def close(self, timeout: float = 2.0) -> None:
        """Tell the server to unmap every segment of this link (best effort), and unmap them
        here."""
        with self._lock:
            self._closed = True
            slots, self._free = self._free, []
            handles, self._handles = sorted(self._handles), set()
        for slot in slots:
            slot.segment.close()
        if not handles:
            return
        try:
            self._stub.ShmDetach(pb.ShmDetachRequest(client=self._client, segments=handles),
                                 timeout=timeout)
        except grpc.RpcError:
            pass  # the server is gone, or reaps the segments when this process ends


def release(leases: list) -> None:
    """Give back the segments of replies read without a copy (:meth:`ShmCall.result`)."""
    while leases:
        link, slot = leases.pop()
        link._give_back(slot, True)


class ShmCall:
    """One exchange in flight through a segment of a :class:`ShmLink`."""

    def __init__(self, link: ShmLink, slot: _Slot, reply_offset: int, future: Any) -> None:
        self._link = link
        self._slot: _Slot | None = slot
        self._offset = reply_offset
        self._future = future

    def result(self, leases: list | None = None) -> bytes | memoryview:
        """The serialized DataReply. Raises grpc.RpcError as an Exchange would, and
        UnknownSegment when the server no longer knows the segment (nothing was processed).

        With ``leases`` the reply is not copied: a view into the segment is returned and the
        segment is appended to ``leases``; it is reused only after :func:`release` of it."""
        slot = self._slot
        assert slot is not None, "result() called twice"
        self._slot = None
        ok = False
        leased = False
        try:
            try:
                answer = self._future.result()
            except grpc.RpcError as error:
                if _unknown(error):
                    raise UnknownSegment(error.details()) from None
                # An answered status: the server is done with the segment. A deadline, a
                # cancellation or a lost connection: it may still be using it.
                ok = _answered(error)
                raise
            ok = True
            if answer.reply_size < 0:
                return answer.inline
            if answer.reply_size > slot.segment.size - self._offset:
                raise ParamServerError(
                    f"{self._link.address}: the server wrote a reply of {answer.reply_size} "
                    f"bytes in a room of {slot.segment.size - self._offset}")
            reply = slot.segment.view[self._offset:self._offset + answer.reply_size]
            if leases is None:
                return bytes(reply)
            leases.append((self._link, slot))
            leased = True
            return reply
        finally:
            if not leased:
                self._link._give_back(slot, ok)

    def cancel(self) -> None:
        """Cancel the call; its segment is not reused (the server may be reading it)."""
        self._future.cancel()
        slot, self._slot = self._slot, None
        if slot is not None:
            self._link._give_back(slot, False)


class _Done:
    """A finished call's outcome, shaped as a gRPC future."""

    def __init__(self, outcome: Any) -> None:
        self._outcome = outcome

    def result(self) -> Any:
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome

    def cancel(self) -> bool:
        return False


class _Refused(ParamServerError):
    """The server would not map a segment (the reason is the message)."""


def _metadata(error: grpc.RpcError) -> tuple:
    try:
        return tuple(error.trailing_metadata() or ())
    except Exception:
        return ()


def _unknown(error: grpc.RpcError) -> bool:
    return any(key == _UNKNOWN_KEY for key, _ in _metadata(error))


def _answered(error: grpc.RpcError) -> bool:
    """Whether a handler produced the status (so it has finished with the segment)."""
    code = error.code() if hasattr(error, "code") else None
    return code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, None)


# -- the server's side ------------------------------------------------------------------------------

@dataclass
class _Client:
    pid: int
    started: str
    segments: dict[int, Segment] = field(default_factory=dict)


class ShmRegistry:
    """A server's mapped segments, by handle, and the workers they belong to. Thread safe.

    Args:
        node: the server's name (for messages).
        willing: whether this server accepts shared memory at all (``--transport``).
    """

    def __init__(self, node: str, willing: bool = True) -> None:
        self.node = node
        self.willing = willing
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._by_handle: dict[int, tuple[str, Segment]] = {}
        self._boot = boot_id()

    def attach(self, request: pb.ShmAttachRequest) -> pb.ShmAttachReply:
        """Map a worker's segment if shared memory is possible between the two; else say why."""
        def refuse(why: str) -> pb.ShmAttachReply:
            return pb.ShmAttachReply(accepted=False, reason=f"{self.node}: {why}")

        if not self.willing:
            return refuse("shared memory is turned off (--transport grpc)")
        if not request.boot_id or request.boot_id != self._boot:
            return refuse("the worker runs on another host (boot ids differ)")
        started = _start_time(request.pid)
        if not started:
            return refuse(f"the worker's process {request.pid} is not visible here (another "
                          f"pid namespace)")
        try:
            segment = Segment.attach(request.name, request.size)
        except (OSError, ValueError) as exc:
            return refuse(f"cannot map the worker's segment: {exc}")
        handle = secrets.randbits(63) or 1
        with self._lock:
            client = self._clients.get(request.client)
            if client is None or client.pid != request.pid or client.started != started:
                client = self._clients[request.client] = _Client(request.pid, started)
            client.segments[handle] = segment
            self._by_handle[handle] = (request.client, segment)
        return pb.ShmAttachReply(accepted=True, segment=handle)

    def segment(self, request: pb.ShmExchangeRequest) -> tuple[memoryview, memoryview]:
        """The request bytes and the reply room an exchange names. UnknownSegment for a handle
        this server does not hold; ValueError for bounds outside the segment."""
        with self._lock:
            entry = self._by_handle.get(request.segment)
        if entry is None:
            raise UnknownSegment(f"{self.node} holds no shared-memory segment {request.segment} "
                                 f"(it restarted, or the worker detached it): attach again")
        segment = entry[1]
        size, offset, room = request.request_size, request.reply_offset, request.reply_capacity
        if not 0 <= size <= segment.size or not size <= offset <= segment.size \
                or not 0 <= room <= segment.size - offset or offset % 16:
            raise ValueError(f"shared-memory exchange out of bounds: request of {size} bytes, "
                             f"reply at {offset} (+{room}) in a segment of {segment.size} bytes "
                             f"(the reply must start 16-byte aligned after the request)")
        view = segment.view
        return view[:size], view[offset:offset + room]

    def detach(self, client: str, handles: list[int] | None = None) -> None:
        """Unmap ``handles`` of ``client`` (all of them when None)."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                return
            for handle in list(entry.segments) if not handles else handles:
                segment = entry.segments.pop(handle, None)
                if segment is not None:
                    self._by_handle.pop(handle, None)
            if not entry.segments:
                del self._clients[client]
        # Views held by a call in progress keep their mapping until the call ends.

    def reap(self) -> list[str]:
        """Unmap the segments of workers whose process ended; return those workers' ids."""
        with self._lock:
            gone = [c for c, e in self._clients.items() if _start_time(e.pid) != e.started]
        for client in gone:
            self.detach(client)
        return gone

    def stats(self) -> tuple[int, int]:
        """Workers with mapped segments, and the bytes mapped."""
        with self._lock:
            return len(self._clients), sum(s.size for _, s in self._by_handle.values())

    def close(self) -> None:
        """Unmap everything."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            self.detach(client)


def janitor(registry: ShmRegistry, stop: threading.Event, every: float = 1.0
            ) -> threading.Thread:
    """A daemon thread calling ``registry.reap()`` every ``every`` seconds until ``stop``."""
    def run() -> None:
        while not stop.wait(every):
            registry.reap()

    thread = threading.Thread(target=run, name="ps-shm-janitor", daemon=True)
    thread.start()
    return thread


def unknown_metadata() -> tuple[tuple[str, str]]:
    """The trailing metadata of an UnknownSegment status."""
    return ((_UNKNOWN_KEY, "unknown-segment"),)
