"""A step's job-record writes as compare-and-set script calls, where each was a WATCH/MULTI transaction.

A step's pick-up and its success each change the job record. The change is computed in Python, as
:meth:`~mesh.broker.jobs.JobStore.update` computes it, and applied by ``scripts/step.lua``, which
writes it only while the record is still the one it was computed from (its bytes, or their sha1 for a
large one) and the attempt's claim is still its owner's; a record changed meanwhile comes back in the
answer and the change is computed again. So a write costs no WATCH, no read round trip and no MULTI,
and the success reads nothing at all: it is computed from the record the pick-up wrote, validated once.

The success write also stores the claim as ``done`` with the step's result and settles the message
(what the consumer's ack did), in the same script: record, trace events, counters, the next steps'
messages, ``done`` and the ack land together or not at all. The lease says so (``Lease.settled``),
and the consumer sends no ack of its own for that message. (A command Redis refuses, a key of the
wrong type, fails its write as it failed the MULTI/EXEC: the write's other commands ran, its ``done``
and its ack did not, and the consumer's failure path settles the message from the record.)

A success whose change sends a message to a queue this worker consumes, while that consumer's window
has room, also fetches for it in the same script call (``step.lua``'s eager fetch): the queue's next
message in lane order, claimed and put in the worker's acks set as the consumer's fetch would, is handed
to dramatiq by the sender thread once the call is answered (:class:`~mesh.broker.consumer.EagerSlot`).
A sequential pipeline's next step then starts with no wake-up token, no fetch round trip and no
validation of the record (it is the one the success left). The write's own wake-up token for that
queue is left out of its commands, not pushed and taken back (:func:`_token_owed`): ``step.lua`` pushes
it only when the fetch takes nothing (or is not run), so every message left waiting keeps its token.
A call that failed, or that was sent again after it landed, may have fetched a message nobody took: the
consumer reclaims its queue before its next fetch.

When what the eager fetch takes is the write's own message of the same job's next step (a sequential
pipeline) and its claim is won, the same call writes that step's pick-up too (the record's step
``running`` with the claim's token, its ``picked_up`` event, its running index entry): the pick-up is
computed before the call (:attr:`StepWrites.pick_up`, the runtime's), with :data:`SENTINEL` as its token,
and ``step.lua`` puts the claim's token in its place (in the record, its digits padded with spaces to
the sentinel's width, written in place with SETRANGE: :func:`padded_token`). The handed message's attempt then finds its
pick-up written (:attr:`~mesh.broker.idempotency.Lease.picked`) and writes none of its own; nor does it
validate its envelope and input again, which the pick-up validated from the very same message (:class:`Picked`;
the deadline is checked again). A fetch that
took another message, or lost its claim, writes nothing of it, and that message's pick-up is written as
any other's.
Nor is a pick-up folded while the worker's work queue holds messages its threads have yet to start: the
handed step would wait behind them with its record saying ``running``, and a ``mesh cancel`` meanwhile
would let it run. Nor is the pick-up of a step whose key is also claimed in another shard (a key shared
across shards, :mod:`mesh.broker.shared_claims`): another job may hold it there, and the step would wait
on the delay queue with its record saying ``running``.

The writes of a worker's threads go to Redis together (:class:`~mesh.broker.group_commit.GroupCommit`):
one script call per group, the group's counters added up and written once per field. (Sending a lone
write from its own thread instead made a sequential pipeline slower, not faster, where it was measured.)
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from mesh.contracts import JobRecord, LeaseLost, dumps

from . import lanes
from .claims import script_source
from .connection import HeldConnection, may_hold, run_script, staged
from .group_commit import GroupCommit
from .jobs import SPLICED_STEPS, Change, JobNotFound, JobStore, validated

if TYPE_CHECKING:
    from .consumer import EagerSlot
    from .idempotency import Lease

logger = logging.getLogger(__name__)

STEP_LUA = script_source("step.lua", lanes.LIB)

#: Commands a script cannot run: a write staging one goes as a WATCH/MULTI transaction instead.
SCRIPTED = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL"})

#: Times a write computes its change again from a record another writer changed meanwhile.
CONFLICT_RETRIES = 50

#: Largest record a write names by its bytes, compared whole by the script, rather than by its sha1: a
#: comparison costs Redis less than the sha1 of a record of a few kilobytes (and the worker no hash); a
#: larger record's bytes would cost more to send than its hash costs to compute.
COMPARED_BYTES = 4096

#: Most argument bytes one script call of a group carries: a group of large writes (a fan-out's
#: messages) goes in more calls, so that Redis holds no more than this (twice: the command's arguments
#: and the script's ARGV) at once for it, not 64 large writes' worth. A larger write goes alone.
CALL_BYTES = 8 * 1024 * 1024
#: What a write's size counts by length (a tuple: ``bytes | str`` would build a union at every argument).
_SIZED = (bytes, str)

#: The fencing token a next step's pick-up is computed with before its claim is taken (see the module's
#: docstring): ``step.lua`` replaces these digits by the claim's token wherever they occur in the
#: pick-up's commands, so a pick-up is folded only when they occur nowhere else (:meth:`PickUp.check`).
SENTINEL = 7318049265110382947
_SENTINEL = str(SENTINEL).encode()

#: Most records, and most of their bytes, a process keeps of what it wrote last (:class:`Recent`).
RECENT_RECORDS = 256
RECENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Written:
    """A job record as a write left it (or found it unchanged) and its bytes: what the next write of
    the same attempt is computed from, with no read."""

    record: JobRecord
    data: bytes


@dataclass(frozen=True)
class Picked(Written):
    """A folded pick-up's record as the call that fetched its message wrote it (:meth:`PickUp.landed`), with
    what the pick-up validated of that message: its envelope's data (``raw``), the envelope and the input as
    validated from it. The step's attempt, handed the same message (its id is the one the call fetched, whose
    body the call itself stored), takes them as they are when its envelope's data is ``raw``, rather than
    validating them again."""

    raw: Any = None
    envelope: Any = None
    payload: Any = None


class Recent:
    """The record this process wrote last for each of a few jobs, with its bytes: a write computed from
    bytes read back (a step's pick-up, from its fetch; a write whose record changed meanwhile) that are
    exactly these takes the record as it is, instead of validating the bytes again. A pipeline's next
    step, picked up where its last step succeeded, then validates nothing (the validation of a record
    costs with its size: every step of the pipeline). Bytes that differ by one byte are validated.
    A record is frozen, so the one kept is the one the write left."""

    def __init__(self, records: int = RECENT_RECORDS, size: int = RECENT_BYTES, steps: int = SPLICED_STEPS) -> None:
        """``steps``: fewest steps a record kept has (a smaller one costs little to validate)."""
        self.records, self.size, self.steps = records, size, steps
        self._kept: OrderedDict[str, Written] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def record(self, job_id: str, data: bytes) -> JobRecord | None:
        """The record written last as ``data`` for ``job_id`` by this process, or None."""
        kept = self._kept.get(job_id)
        return kept.record if kept is not None and kept.data == data else None

    def last(self, job_id: str) -> JobRecord | None:
        """The record written last for ``job_id`` by this process (maybe changed since), or None."""
        kept = self._kept.get(job_id)
        return None if kept is None else kept.record

    def keep(self, job_id: str, written: Written) -> None:
        if len(written.data) > self.size or len(written.record.steps) < self.steps:
            return
        with self._lock:
            old = self._kept.pop(job_id, None)
            if old is not None:
                self._bytes -= len(old.data)
            self._kept[job_id] = written
            self._bytes += len(written.data)
            while len(self._kept) > self.records or self._bytes > self.size:
                _, gone = self._kept.popitem(last=False)
                self._bytes -= len(gone.data)


def padded_token(token: int) -> bytes:
    """A claim's token as a folded pick-up's record holds it: its digits, then spaces up to the width of
    :data:`SENTINEL`'s (``step.lua`` writes them in place of the sentinel's, with SETRANGE)."""
    return str(token).encode().ljust(len(_SENTINEL))


#: SET's options that leave it a plain write of its value (as ``step.lua``'s PLAIN_SET).
_PLAIN_SET = frozenset({b"EX", b"PX", b"EXAT", b"PXAT", b"KEEPTTL"})


def _plain_set(command: Sequence[Any]) -> bool:
    """Whether ``command`` is a SET that ``step.lua`` writes as it is and then fills the token in with
    SETRANGE: no NX, XX nor GET among its options (each an option of :data:`_PLAIN_SET` or a number)."""
    if len(command) < 3 or str(command[0]).upper() != "SET":
        return False
    for option in command[3:]:
        if isinstance(option, int | float):
            continue
        word = option if isinstance(option, bytes) else str(option).encode()
        if word.upper() not in _PLAIN_SET and not word.isdigit():
            return False
    return True


@dataclass(frozen=True)
class PickUp:
    """A next step's pick-up computed from the record a success write leaves, before the claim of that
    step's message is taken: its message's id, its commands (the record with :data:`SENTINEL` as the
    step's token, its ``picked_up`` event, its running index entry) and the record they write."""

    rid: str
    step_id: str
    commands: list[Any]
    written: Written
    #: The message's envelope data, and the envelope and input the pick-up validated from it (:class:`Picked`).
    raw: Any = None
    envelope: Any = None
    payload: Any = None

    def check(self) -> bool:
        """Whether :data:`SENTINEL`'s digits occur exactly where the token is (once in the record, once
        in an event) and nowhere else, so that replacing them fills in the token and nothing more."""
        # The record is scanned once: it is the value of a plain SET among the commands, whose count is its own.
        seen, record, held = 0, self.written.data, None
        for command, _options in self.commands:
            plain = held is None and _plain_set(command)
            for given in command:
                arg = given.encode() if isinstance(given, str) else given
                if isinstance(arg, bytes):
                    n = arg.count(_SENTINEL)
                    if n > 1:
                        return False
                    seen += n
                    if plain and held is None and given == record:
                        held = n
        return seen == 2 and held == 1

    def args(self) -> list[Any]:
        out: list[Any] = [self.rid, _SENTINEL, len(self.commands)]
        for command, _options in self.commands:
            out.append(len(command))
            out.extend(command)
        return out

    def landed(self, token: int) -> Picked:
        """The record as ``step.lua`` wrote it with the claim's ``token``: its digits in place of the
        sentinel's, padded with spaces to their width (JSON whitespace, written in place by SETRANGE)."""
        record = self.written.record
        step = record.steps[self.step_id].replaced({"token": token})
        return Picked(record.with_step(step), self.written.data.replace(_SENTINEL, padded_token(token)),
                      self.raw, self.envelope, self.payload)


@dataclass
class _Item:
    lease: Lease
    args: list[Any]
    settles: bool
    size: int = 0
    #: The consumer place the write's eager fetch fills, and what the write leaves (for the job's next step).
    slot: EagerSlot | None = None
    job: bytes = b""
    written: Written | None = None
    #: The next step's pick-up the call writes when its eager fetch takes that step's message.
    pickup: PickUp | None = None
    #: The call wrote it: what the process keeps as the job's last record (:class:`Recent`).
    picked: bool = False


class StepWrites:
    """Fenced compare-and-set writes of steps' job records, in groups (see the module's docstring)."""

    def __init__(self, client: redis.Redis, jobs: JobStore, dedup_ttl_s: float) -> None:
        self.client = client
        self.jobs = jobs
        self.dedup_ttl_s = int(dedup_ttl_s)
        self.script = client.register_script(STEP_LUA)
        #: The connection the sender's calls go on, kept rather than checked out of the pool and back per
        #: call (``connection.HeldConnection``; the group commit has one sender); None: the pool's own.
        self.held = HeldConnection(client) if may_hold(client) else None
        #: The script's KEYS: the namespace's prefix, which the script does not read (its keys come in its
        #: ARGV, every one built by broker/keys.py) but a Redis Cluster client routes the call by.
        self.route = [jobs.keys.prefix]
        self.group: GroupCommit[_Item] = GroupCommit(self._flush, name="mesh-step-writes")
        self.recent = Recent()
        #: A queue's place in this process's consumer for a success's eager fetch, or None
        #: (``MeshBroker.eager_slot``, set where a worker's agents are declared); None: no eager fetches.
        self.eager: Callable[[str], EagerSlot | None] | None = None
        #: The pick-up of a success's next step of the same job, computed from the record the success
        #: leaves with :data:`SENTINEL` as its token (the runtime's), or None: not folded.
        self.pick_up: Callable[[JobRecord, bytes, Any], PickUp | None] | None = None

    def write(self, job_id: str, change: Change, *, fence: Lease, events: Sequence[dict[str, Any]] = (),
              also: Callable[[Any, JobRecord], None] | None = None, retention_s: float | None = None,
              known: Written | None = None, read: bytes | None = None, done: bytes | None = None,
              settle: bool = False) -> Written:
        """Apply ``change`` to the job's record while ``fence`` holds its key, as
        :meth:`~mesh.broker.jobs.JobStore.update` does (``events``, ``also``, ``retention_s`` alike),
        computed from ``known``, else from ``read`` (the record's bytes as read earlier, maybe changed
        since), else from one read. ``done``: the claim's result, stored with the claim as
        done by the same write; ``settle``: the write settles the attempt's message (``fence.settles``,
        when the consumer gave it one) as the ack would. LeaseLost when
        the key is no longer the attempt's, JobNotFound without a record; nothing is written then. A
        write that stages a script of its own goes as :meth:`~mesh.broker.jobs.JobStore.update`'s
        transaction, and settles nothing (the consumer's ack does)."""
        key = self.jobs.keys.job(job_id)
        data = known.data if known is not None else read
        before = known.record if known is not None else None
        for _ in range(CONFLICT_RETRIES):
            if data is None:
                data = self.client.get(key)  # type: ignore[assignment]
                if data is None:
                    raise JobNotFound(job_id)
            if before is None:
                before = self.recent.record(job_id, data) or validated(data, self.recent.last(job_id))
                if before.job_id != job_id:  # bytes read for another job (a message naming two): read again
                    data = before = None
                    continue
            record, messages = change(before)
            pipe = self.client.pipeline(transaction=False)
            new = data
            if record is not before or messages:
                self.jobs.stage_write(pipe, before, record, messages, events=events, also=also,
                                      retention_s=retention_s)
                if any(command[0] in SCRIPTED for command, _options in staged(pipe)):
                    # A write that runs a script of its own (an approval's timers) cannot run inside
                    # this one: it goes as a transaction, and the consumer's ack settles the message.
                    record = self.jobs.update(job_id, change, fence=fence, events=events, also=also,
                                              retention_s=retention_s)
                    return Written(record, dumps(record))
                new = _record_bytes(staged(pipe), key) or dumps(record)
            slot = self._slot(messages) if settle and messages else None
            pickup = self._pickup(job_id, record, new, messages, slot) if slot is not None else None
            try:
                item = self._item(key, data, staged(pipe), fence, done, settle, slot, pickup)
                if slot is not None:
                    item.job, item.written = job_id.encode(), Written(record, new)
                answer = self.group.submit(item)
            finally:
                if slot is not None:
                    slot.release()
            if isinstance(answer, redis.ResponseError):
                raise answer
            if answer in (1, 2):
                written = Written(record, new)
                if not item.picked:  # else the record kept is the pick-up's, written after it
                    self.recent.keep(job_id, written)
                return written
            if answer == 0:
                raise LeaseLost(fence.key, fence.token)
            if answer == -1:
                raise JobNotFound(job_id)
            data, before = answer, None  # changed since it was read: computed again
        raise RuntimeError(f"job record {job_id} kept changing while a step was written")

    def _slot(self, messages: Sequence[Any]) -> EagerSlot | None:
        """A place in this process's consumer of the first queue among ``messages``' (those due now)
        that has one: the write then fetches that queue's next message for it (see ``step.lua``)."""
        if self.eager is None:
            return None
        for message in messages:
            if message.options.get("eta") is None:
                slot = self.eager(message.queue_name)
                if slot is not None:
                    return slot
        return None

    def _pickup(self, job_id: str, record: JobRecord, data: bytes, messages: Sequence[Any],
                slot: EagerSlot) -> PickUp | None:
        """The pick-up of the message among ``messages`` that is this job's next step on ``slot``'s
        queue, computed from ``record`` (as ``data``), or None."""
        if self.pick_up is None:
            return None
        work = getattr(slot.thread, "work_queue", None)
        if work is not None and not work.empty():
            # The step would wait behind what its worker's threads have yet to start (the work queue is
            # shared by all its agents), not started: its record must not say running meanwhile, and a
            # mesh cancel meanwhile must keep it from running, as for any step not picked up yet.
            return None
        for message in messages:
            envelope = message.args[0] if message.args else None
            if (message.queue_name == slot.consumer.queue_name and message.options.get("eta") is None
                    and isinstance(envelope, dict) and envelope.get("job_id") == job_id):
                try:
                    pickup = self.pick_up(record, data, message)
                except Exception:  # not folded: the step's own pick-up is written as any other's
                    logger.exception("a next step's pick-up could not be computed with its success")
                    return None
                return pickup if pickup is not None and pickup.check() else None
        return None

    def _item(self, key: str, data: bytes, commands: list[Any], fence: Lease, done: bytes | None,
              settle: bool, slot: EagerSlot | None = None, pickup: PickUp | None = None) -> _Item:
        settles = settle and fence.settles is not None
        acks, msgs, rid = fence.settles if settles and fence.settles is not None else ("", "", "")
        eager: list[Any] = []
        if slot is not None and settles:
            # The wake-up token of the message the fetch takes is neither pushed nor taken back: the
            # write's own token for its queue is left out, and owed ("1") should the fetch take nothing.
            commands, owed = _token_owed(commands, f"{slot.args[0]}.wake")
            eager = [*slot.args, owed]
        if eager and pickup is not None:
            eager = [*eager, *pickup.args()]
        else:
            pickup = None
        args: list[Any] = [key, _expected(data), fence.claim_key, fence.owner, fence.token,
                           "1" if fence.shared else "0", "1" if done is not None else "0", done or b"",
                           rid, acks, msgs, len(eager), *eager, len(commands)]
        # The size: a bytes or str argument its length, anything else (an integer) 8, added up in one
        # plain loop (a genexpr summed per write was the step's largest own cost).
        size = 0
        for arg in args:
            size += len(arg) if isinstance(arg, _SIZED) else 8
        for command, _options in commands:
            args.append(len(command))
            args.extend(command)
            size += 8
            for arg in command:
                size += len(arg) if isinstance(arg, _SIZED) else 8
        return _Item(fence, args, settles, size, slot if eager else None, pickup=pickup)

    def _flush(self, group: Sequence[_Item]) -> list[Any]:
        answers: list[Any] = []
        call: list[_Item] = []
        size = 0
        for item in group:
            if call and size + item.size > CALL_BYTES:
                answers += self._flush_call(call)
                call, size = [], 0
            call.append(item)
            size += item.size
        return answers + self._flush_call(call) if call else answers

    def _flush_call(self, group: Sequence[_Item]) -> list[Any]:
        try:
            answers = self._call(group)
        except redis.ResponseError:
            if len(group) == 1:
                raise
            # A command Redis refuses fails only its own write (step.lua answers it with the error); a
            # group refused as a whole (out of memory, before anything was written) must not fail every
            # write in it: each goes alone, and one that landed finds its record changed (by itself)
            # and is computed again into nothing left to write.
            answers = []
            for item in group:
                try:
                    answers += self._call([item])
                except redis.ResponseError as exc:
                    answers.append(exc)
        return answers

    def _call(self, group: Sequence[_Item]) -> list[Any]:
        args: list[Any] = [self.dedup_ttl_s]
        for item in group:
            args.extend(item.args)
        slots = [item.slot for item in group if item.slot is not None]
        if not slots:
            return self._answers(group, self.evalsha(args))
        # A reclaim must not put back a message this call fetches before it is in hand (consumer._fetch).
        with slots[0].consumer.broker.eager_lock:
            sent = time.monotonic()  # a fetched claim's lease counts from before the call went out
            try:
                answers: list[Any] = self.evalsha(args)
            except BaseException:
                for slot in slots:
                    slot.lost()  # it may have fetched before the call failed
                raise
            for n, item in enumerate(group):
                answer, held = answers[n], item.slot
                if held is None:
                    continue
                if isinstance(answer, list):
                    answers[n], fetched = answer[0], answer[1:]
                    record = item.written.data if item.written is not None else b""
                    if item.written is not None:  # what the next step's pick-up reads, kept before it runs
                        self.recent.keep(item.job.decode(), item.written)
                    picked: Written | Exception | None = None
                    if len(fetched) > 3:  # the fetched message's pick-up ran too (see _pickup)
                        flag, fetched = fetched[3], fetched[:3]
                        if flag == 1 and item.pickup is not None:
                            picked = item.pickup.landed(int(fetched[2][2]))
                            self.recent.keep(item.job.decode(), picked)
                            item.picked, record = True, picked.data
                        else:  # a command of it refused: its attempt fails as a refused pick-up does
                            picked = redis.ResponseError(flag.decode() if isinstance(flag, bytes) else str(flag))
                    settles = item.lease.settles
                    if answers[n] == 1 and item.settles and settles is not None and settles[0] == held.args[1]:
                        held.consumer.written_off.add(settles[2])  # settled: no longer takes a place
                    try:
                        held.hand(fetched, sent, item.job, record, picked)
                    except Exception:  # the write stands; what it fetched goes back by the reclaim
                        logger.exception("a fetched message could not be handed over: its queue is reclaimed")
                        held.lost()
                elif answer in (1, 2):
                    held.lost()  # sent again after it landed: what its first call fetched is not known
        return self._answers(group, answers)

    def evalsha(self, args: list[Any]) -> Any:
        """One call of step.lua: EVALSHA without redis-py's per-call wrapping (``connection.run_script``)."""
        return run_script(self.script, self.route, args, self.held)

    def _answers(self, group: Sequence[_Item], answers: list[Any]) -> list[Any]:
        for item, answer in zip(group, answers, strict=True):
            if item.settles and answer in (1, 2):
                # Before the caller wakes: an exception raised into it meanwhile (a time limit) finds the
                # message settled, and the consumer sends no ack of its own.
                item.lease.settled = True
        return answers


def _expected(data: bytes) -> bytes | str:
    """What step.lua checks the record against: its bytes (compared whole), or, for a record of 40 bytes
    or fewer or over :data:`COMPARED_BYTES`, its sha1 (40 hex digits, which tells the two apart)."""
    return data if 40 < len(data) <= COMPARED_BYTES else hashlib.sha1(data).hexdigest()


def _token_owed(commands: list[Any], wake: str) -> tuple[list[Any], str]:
    """``commands`` with one wake-up token fewer pushed on ``wake`` (the queue an eager fetch takes its
    message from), and "1" when one was taken out (step.lua pushes it when its fetch takes nothing, or
    does not run), else "0" (commands unchanged). The tokens are the outbox's: one ``RPUSH`` of n
    tokens followed by its ``LTRIM`` (outbox.wake); a push of one token goes with its trim."""
    for at, (command, options) in enumerate(commands):
        if command[0] == "RPUSH" and command[1] == wake:
            if len(command) > 3:
                return [*commands[:at], (command[:-1], options), *commands[at + 1:]], "1"
            after = at + 2 if at + 1 < len(commands) and commands[at + 1][0][:2] == ("LTRIM", wake) else at + 1
            return [*commands[:at], *commands[after:]], "1"
    return commands, "0"


def _record_bytes(commands: list[Any], key: str) -> bytes | None:
    """The record a staged write sets at ``key`` (the SET's value), or None."""
    for command, _options in commands:
        if command[0] == "SET" and command[1] == key:
            value = command[2]
            return value if isinstance(value, bytes) else str(value).encode()
    return None
