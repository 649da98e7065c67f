"""WriteGate: admission of write messages and one server's half of a consistent cut.

Threads stand in for concurrent requests; every join is bounded, and no test asserts how long
anything took (the only timeouts are the gate's own, which a test makes expire on purpose).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from paramserver.cut import WriteGate, WritesHeld, gone_clients, op_key
from paramserver.errors import PSTimeoutError
from paramserver.v1 import paramserver_pb2 as pb

#: Bound on any join: far above what any step needs, so hitting it means a hang.
JOIN = 30.0
LONG_LEASE = 600.0


def tag(client: str, seq: int, servers: list[int], parts: list[int] | None = None,
        done_below: int = 0) -> pb.OpTag:
    return pb.OpTag(client=client, seq=seq, servers=servers,
                    parts=parts if parts is not None else [1] * len(servers),
                    done_below=done_below)


def gate(rank: int = 0) -> WriteGate:
    g = WriteGate("server-0@127.0.0.1:1")
    g.rank = rank
    return g


class Background:
    """Run ``fn`` on a thread; keep its result or exception and what had happened when it
    returned (``marks`` is a list the test appends to)."""

    def __init__(self, fn: Callable[[], Any], marks: list[str] | None = None) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.marks_at_return: list[str] | None = None
        self._marks = marks if marks is not None else []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._fn = fn
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
        self.marks_at_return = list(self._marks)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> Any:
        self._thread.join(JOIN)
        assert not self._thread.is_alive(), "background call did not return"
        if self.error is not None:
            raise self.error
        return self.result


def enter_when_admitted(g: WriteGate, t: pb.OpTag) -> tuple[str, int] | None:
    """Retry a refused message as a client does, until the gate admits it (bounded)."""
    deadline = time.monotonic() + JOIN
    while True:
        try:
            return g.enter(t)
        except WritesHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


# -- open gate -----------------------------------------------------------------------------------

def test_open_gate_admits_untagged_and_tagged_writes() -> None:
    g = gate()
    assert g.holding() is None
    plain = g.enter(None)
    single = g.enter(tag("c", 1, [0]))
    multi = g.enter(tag("c", 2, [0, 1]))
    multipart = g.enter(tag("c", 3, [0], [2]))
    assert plain == ("", -1) and single == ("", -1)  # nothing to track
    assert multi == ("c", 2) and multipart == ("c", 3)
    for handle in (plain, single, multi, multipart):
        g.leave(handle)
    assert g.holding() is None
    g.leave(g.enter(None))  # still open after all of them


def test_op_key() -> None:
    assert op_key(tag("client-a", 17, [0, 1])) == ("client-a", 17)


def test_tag_without_client_is_treated_as_untagged() -> None:
    g = gate()
    g.leave(g.enter(pb.OpTag(seq=4, servers=[0, 1], parts=[1, 1])))
    assert g.prepare(1, LONG_LEASE) == []
    with pytest.raises(WritesHeld):
        g.enter(pb.OpTag(seq=4, servers=[0, 1], parts=[1, 1]))


# -- prepare -------------------------------------------------------------------------------------

def test_prepare_holds_new_writes() -> None:
    g = gate()
    assert g.prepare(7, LONG_LEASE) == []
    assert g.holding() == 7
    with pytest.raises(WritesHeld, match="server-0@127.0.0.1:1 holds writes for checkpoint cut 7"):
        g.enter(None)
    with pytest.raises(WritesHeld):
        g.enter(tag("c", 1, [0]))
    with pytest.raises(WritesHeld):
        g.enter(tag("c", 2, [0, 1]))


def test_a_multi_part_operation_admitted_before_the_close_is_still_admitted() -> None:
    g = gate()
    first = tag("c", 5, [0, 1], [2, 1])  # two messages here
    g.leave(g.enter(first))
    g.prepare(1, LONG_LEASE)
    second = g.enter(first)  # its second message arrives after the close
    assert second == ("c", 5)
    g.leave(second)
    with pytest.raises(WritesHeld):
        g.enter(tag("c", 6, [0, 1], [2, 1]))  # a new operation is not


def test_prepare_reports_only_multi_server_operations() -> None:
    g = gate(rank=1)
    across = tag("c", 1, [0, 1, 2])
    here_twice = tag("c", 2, [1], [2])
    other_client = tag("d", 9, [1, 3], [1, 4])
    for t in (across, here_twice, other_client):
        g.leave(g.enter(t))
    g.leave(g.enter(tag("c", 3, [1])))
    g.leave(g.enter(None))
    reported = g.prepare(1, LONG_LEASE)
    assert sorted((t.client, t.seq) for t in reported) == [("c", 1), ("d", 9)]
    assert {op_key(t): t for t in reported}[("d", 9)] == other_client


def test_a_new_prepare_replaces_an_unfinished_cut() -> None:
    g = gate()
    g.prepare(1, LONG_LEASE)
    g.prepare(2, LONG_LEASE)
    assert g.holding() == 2
    with pytest.raises(PSTimeoutError, match="cut 1 is no longer open"):
        g.drain(1, [], JOIN)
    assert g.holding() == 2


# -- drain ---------------------------------------------------------------------------------------

def test_drain_with_nothing_in_flight_returns_with_the_gate_closed() -> None:
    g = gate()
    g.prepare(3, LONG_LEASE)
    held = g.drain(3, [], JOIN)
    assert held >= 0.0
    assert g.holding() == 3
    with pytest.raises(WritesHeld):
        g.enter(None)
    g.reopen(3)
    assert g.holding() is None
    g.leave(g.enter(None))


def test_drain_admits_listed_operations_and_waits_for_their_parts() -> None:
    g = gate(rank=1)
    op = tag("c", 4, [0, 1])  # admitted by server 0 before its close; nothing here yet
    g.prepare(1, LONG_LEASE)
    with pytest.raises(WritesHeld):
        g.enter(op)  # before drain it is refused, and the client retries
    marks: list[str] = []
    drain = Background(lambda: g.drain(1, [op], JOIN), marks)
    handle = enter_when_admitted(g, op)  # admitted once drain has run its admission
    assert handle == ("c", 4)
    assert drain.alive()  # the part is in flight: drain cannot have returned
    marks.append("left")
    g.leave(handle)
    drain.join()
    assert drain.marks_at_return == ["left"]
    assert g.holding() == 1  # drain leaves the gate closed


def test_drain_waits_for_the_remaining_parts_of_an_operation_started_before_the_close() -> None:
    g = gate()
    op = tag("c", 1, [0, 1], [3, 1])  # three messages here
    g.leave(g.enter(op))
    reported = g.prepare(1, LONG_LEASE)
    assert [op_key(t) for t in reported] == [("c", 1)]
    marks: list[str] = []
    drain = Background(lambda: g.drain(1, reported, JOIN), marks)
    second = g.enter(op)
    marks.append("second")
    g.leave(second)
    assert drain.alive()  # one message still to come
    third = g.enter(op)
    marks.append("third")
    g.leave(third)
    drain.join()
    assert drain.marks_at_return == ["second", "third"]


def test_drain_waits_for_an_untagged_write_in_flight() -> None:
    g = gate()
    handle = g.enter(None)
    g.prepare(1, LONG_LEASE)
    marks: list[str] = []
    drain = Background(lambda: g.drain(1, [], JOIN), marks)
    assert drain.alive()
    marks.append("left")
    g.leave(handle)
    drain.join()
    assert drain.marks_at_return == ["left"]


def test_drain_ignores_operations_that_do_not_involve_this_server() -> None:
    g = gate(rank=2)
    g.prepare(1, LONG_LEASE)
    assert g.drain(1, [tag("c", 1, [0, 1])], JOIN) >= 0.0
    with pytest.raises(WritesHeld):
        g.enter(tag("c", 1, [0, 1]))


def test_drain_times_out_naming_the_operation_and_client_and_reopens() -> None:
    g = gate(rank=1)
    g.prepare(9, LONG_LEASE)
    lost = tag("worker-3#ab12", 77, [0, 1], [1, 2])
    with pytest.raises(PSTimeoutError) as info:
        g.drain(9, [lost], 0.2)
    message = str(info.value)
    assert "checkpoint cut 9" in message
    assert "operation 77 of client worker-3#ab12" in message
    assert "0 of its 2 messages" in message
    assert g.holding() is None
    g.leave(g.enter(None))  # writes flow again


def test_drain_timeout_with_a_write_stuck_in_flight() -> None:
    g = gate()
    handle = g.enter(None)
    g.prepare(2, LONG_LEASE)
    with pytest.raises(PSTimeoutError, match="1 writes in flight"):
        g.drain(2, [], 0.2)
    assert g.holding() is None
    g.leave(handle)


def test_drain_does_not_wait_for_an_operation_its_client_reported_complete() -> None:
    """Server 0 applied operation 5 (servers 0 and 1), then got operation 6 from the same client,
    a single-server write with done_below=6: the client says 5 is acknowledged everywhere, so
    server 0 forgets it. Server 1 still remembered 5 at its close and reported it; drain here must
    not wait for a message of 5 that was applied long ago."""
    g = gate(rank=0)
    g.leave(g.enter(tag("c", 5, [0, 1])))
    g.leave(g.enter(tag("c", 6, [0], done_below=6)))
    assert g.prepare(1, LONG_LEASE) == []
    reported_by_server_1 = [tag("c", 5, [0, 1])]
    assert g.drain(1, reported_by_server_1, 0.5) >= 0.0
    assert g.holding() == 1


# -- lease, pruning, reopen ----------------------------------------------------------------------

def test_lease_expiry_reopens_the_gate_at_the_next_enter() -> None:
    g = gate()
    g.prepare(4, 0.0)
    time.sleep(0.01)  # let the (zero) lease pass; no timing is asserted
    assert g.holding() == 4  # nothing reopens it until a write arrives
    handle = g.enter(None)
    assert g.holding() is None
    g.leave(handle)


def test_a_long_lease_keeps_holding() -> None:
    g = gate()
    g.prepare(4, LONG_LEASE)
    for _ in range(3):
        with pytest.raises(WritesHeld):
            g.enter(None)
    assert g.holding() == 4


def test_done_below_prunes_finished_operations() -> None:
    g = gate()
    for seq in (1, 2, 3):
        g.leave(g.enter(tag("c", seq, [0, 1])))
    g.leave(g.enter(tag("other", 1, [0, 1])))
    unfinished = g.enter(tag("c", 4, [0, 1]))  # still in flight
    # The client's next operation says everything below 5 is acknowledged.
    g.leave(g.enter(tag("c", 5, [0, 1], done_below=5)))
    reported = g.prepare(1, LONG_LEASE)
    assert sorted(op_key(t) for t in reported) == [("c", 4), ("c", 5), ("other", 1)]
    g.leave(unfinished)


def test_done_below_never_moves_back() -> None:
    g = gate()
    g.leave(g.enter(tag("c", 1, [0, 1], done_below=0)))
    g.leave(g.enter(tag("c", 3, [0, 1], done_below=3)))  # forgets 1
    g.leave(g.enter(tag("c", 2, [0, 1], done_below=1)))  # late, older report
    reported = g.prepare(1, LONG_LEASE)
    assert sorted(op_key(t) for t in reported) == [("c", 2), ("c", 3)]


def test_reopen_of_a_stale_cut_is_a_no_op() -> None:
    g = gate()
    g.prepare(1, LONG_LEASE)
    g.prepare(2, LONG_LEASE)
    assert g.reopen(1) >= 0.0
    assert g.holding() == 2
    with pytest.raises(WritesHeld):
        g.enter(None)
    g.reopen(2)
    assert g.holding() is None
    assert g.reopen(2) >= 0.0  # again: nothing to do
    g.leave(g.enter(None))


def test_reopen_forgets_the_admitted_set() -> None:
    g = gate()
    op = tag("c", 1, [0, 1], [2, 1])
    g.leave(g.enter(op))
    g.prepare(1, LONG_LEASE)
    g.reopen(1)
    g.prepare(2, LONG_LEASE)  # op 1 is still unfinished here, so it stays admitted
    g.leave(g.enter(op))
    with pytest.raises(WritesHeld):
        g.enter(tag("c", 2, [0, 1]))


def test_concurrent_writers_and_a_cut() -> None:
    """Many threads write two-part operations while a cut runs: every operation admitted is
    complete when drain returns, and the gate admits none after the close that it had not
    admitted before."""
    g = gate()
    stop = threading.Event()
    lock = threading.Lock()
    finished: dict[tuple[str, int], int] = {}

    def writer(name: str) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            t = tag(name, seq, [0, 1], [2, 1], done_below=seq)
            for _ in range(2):
                handle = enter_when_admitted(g, t)
                assert handle is not None
                with lock:
                    finished[handle] = finished.get(handle, 0) + 1
                g.leave(handle)

    threads = [threading.Thread(target=writer, args=(f"w{i}",), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN
    while True:  # let every writer get going before the cut
        with lock:
            if len({key[0] for key in finished}) == len(threads):
                break
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.001)
    reported = g.prepare(1, LONG_LEASE)
    g.drain(1, reported, JOIN)
    with lock:
        snapshot = dict(finished)
    stop.set()
    g.reopen(1)
    for t in threads:
        t.join(JOIN)
        assert not t.is_alive()
    assert snapshot and all(count == 2 for count in snapshot.values()), snapshot


# -- clients that are gone -----------------------------------------------------------------------

def test_drain_stops_waiting_for_a_gone_client_and_forgets_its_operation() -> None:
    """Operation 4 of worker-1 reached server 0 and never reaches this server (1): once the
    scheduler says its client is gone, the drain returns with the gate closed, names the
    operation as incomplete, and the next cut no longer carries it."""
    g = gate(rank=1)
    asked: list[set[str]] = []
    g.ask_gone = lambda clients: (asked.append(set(clients)), {"worker-1/abc"})[1]
    lost = tag("worker-1/abc", 4, [0, 1])
    g.prepare(3, LONG_LEASE)
    g.drain(3, [lost], JOIN)
    assert g.holding() == 3
    assert asked == [{"worker-1/abc"}]
    assert g.incomplete and "operation 4 of client worker-1/abc (gone): 0 of its 1" in \
        g.incomplete[0]
    with pytest.raises(WritesHeld):  # a late message is not applied while the state is copied
        g.enter(lost)
    g.reopen(3)
    assert g.prepare(4, LONG_LEASE) == []
    g.drain(4, [lost], JOIN)      # still reported by another server: known gone, not asked
    assert len(asked) == 1
    g.reopen(4)


def test_drain_keeps_waiting_for_a_live_client_and_when_the_scheduler_cannot_answer() -> None:
    g = gate(rank=1)
    answers = iter([set(), RuntimeError("scheduler unreachable")])

    def ask(clients: set[str]) -> set[str]:
        answer = next(answers, set())
        if isinstance(answer, Exception):
            raise answer
        return answer

    g.ask_gone = ask
    g.prepare(5, LONG_LEASE)
    with pytest.raises(PSTimeoutError, match="operation 8 of client worker-0/x"):
        g.drain(5, [tag("worker-0/x", 8, [0, 1])], 0.6)
    assert g.holding() is None


def test_gone_clients_by_the_schedulers_view() -> None:
    view = pb.ClusterView(nodes=[
        pb.NodeInfo(node_id="worker-0", incarnation="a", alive=True),
        pb.NodeInfo(node_id="worker-1", incarnation="b", alive=False),
        pb.NodeInfo(node_id="worker-2", incarnation="c", alive=True, left=True),
        pb.NodeInfo(node_id="worker-3", incarnation="new", alive=True)])
    clients = {"worker-0/a", "worker-1/b", "worker-2/c", "worker-3/old", "worker-9/z",
               "worker-0"}
    assert gone_clients(view, clients) == {"worker-1/b", "worker-2/c", "worker-3/old",
                                           "worker-9/z"}
