"""A saga for compensation and job-control tests: ``book`` books something at a loopback server
(POST ``/do``), ``unbook`` undoes it (POST ``/undo``); both carry the message key as
``Idempotency-Key``, so the server can apply each effect once per key, as a real booking API does.

The pipeline ``trip``: ``flight`` → ``hotel`` → ``car``; flight and hotel are undone by ``unbook``
(the input built from the step's output), car has no compensation. A step whose id is listed in the
set ``{ns}:test.fail`` fails permanently. ``unbook`` undoes, then writes its process id to
``{ns}:test.holder`` and, while ``{ns}:test.hold`` exists, waits (at most 60 s) for
``{ns}:test.release`` (writing what ``ctx.cancelled`` says, and a loop count, to the hash
``{ns}:test.undo_saw``): a test can SIGKILL the worker in the middle of a compensation, after its
effect and before its success is recorded; it fails for good for a ``ref`` listed in
``{ns}:test.fail_undo``. ``book`` waits the same way while
``{ns}:test.hold_book`` lists its step id, watching ``ctx.cancelled``, and writes what it saw to
``{ns}:test.saw_cancel``.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field

from mesh import App, Context, ToolContext, host_port, send_request
from mesh.agents.pipelines import Pipeline
from mesh.broker.keys import prefix
from mesh.contracts import PermanentFailure

app = App("saga")


class Booking(BaseModel):
    url: str
    ref: str = ""


def _ns(ctx: Context) -> str:
    return ctx.runtime.settings.namespace


@app.agent
def book(ctx: Context, booking: Booking) -> Booking:
    """Books ``ctx.step_id`` at the server."""
    r, ns = ctx.runtime.redis, _ns(ctx)
    if r.sismember(f"{prefix(ns)}:test.hold_book", ctx.step_id):
        r.set(f"{prefix(ns)}:test.book_holder", os.getpid())
        end = time.monotonic() + 60
        while not ctx.cancelled and time.monotonic() < end:
            time.sleep(0.05)
        r.set(f"{prefix(ns)}:test.saw_cancel", int(ctx.cancelled))
    if r.sismember(f"{prefix(ns)}:test.fail", ctx.step_id):
        raise PermanentFailure(f"step {ctx.step_id} told to fail")
    ctx.http.post(f"{booking.url}/do", json={"step": ctx.step_id}).raise_for_status()
    return Booking(url=booking.url, ref=ctx.step_id)


@app.agent
def unbook(ctx: Context, booking: Booking) -> Booking:
    """Undoes booking ``ref``."""
    r, ns = ctx.runtime.redis, _ns(ctx)
    if r.sismember(f"{prefix(ns)}:test.fail_undo", booking.ref):
        raise PermanentFailure(f"undo of {booking.ref} told to fail")
    ctx.http.post(f"{booking.url}/undo", json={"ref": booking.ref}).raise_for_status()
    r.set(f"{prefix(ns)}:test.holder", os.getpid())
    if r.exists(f"{prefix(ns)}:test.hold"):  # the effect is made, its success not yet recorded
        end = time.monotonic() + 60
        while not r.exists(f"{prefix(ns)}:test.release") and time.monotonic() < end:
            r.hset(f"{prefix(ns)}:test.undo_saw", mapping={"cancelled": int(ctx.cancelled), "at": time.monotonic()})
            r.hincrby(f"{prefix(ns)}:test.undo_saw", "loops", 1)
            time.sleep(0.05)
    return booking


class Seat(BaseModel):
    url: str
    seat: str


@app.tool(dependency=lambda args: host_port(args.url), compensate="release")
def reserve(ctx: ToolContext, args: Seat) -> dict:
    """Reserves a seat (POST /reserve); ``release`` undoes it."""
    send_request(ctx, "POST", f"{args.url}/reserve", json={"ref": args.seat})
    return {"seat": args.seat}


@app.tool(dependency=lambda args: host_port(args.url))
def release(ctx: ToolContext, args: Seat) -> dict:
    """Releases a seat (POST /release), given the args ``reserve`` was called with."""
    send_request(ctx, "POST", f"{args.url}/release", json={"ref": args.seat})
    return {"seat": args.seat}


@app.agent(tools=["reserve"])
def seats(ctx: Context, booking: Booking) -> Booking:
    """Reserves two seats through the ``reserve`` tool (no ``compensate:`` on its step: the tool's own)."""
    for seat in ("1A", "1B"):
        ctx.call("reserve", {"url": booking.url, "seat": seat})
    return Booking(url=booking.url, ref=ctx.step_id)


UNDO = {"agent": "unbook", "input": {"url": "output.url", "ref": "output.ref"}}

TRIP = app.pipeline(Pipeline("trip")
                    .step("flight", agent="book", compensate=UNDO)
                    .step("hotel", agent="book", depends_on=["flight"], compensate=UNDO)
                    .step("car", agent="book", depends_on=["hotel"]))

#: The same steps without compensations: a failure leaves the job dead-lettered (for rerun tests).
TOUR = app.pipeline(Pipeline("tour")
                    .step("flight", agent="book")
                    .step("hotel", agent="book", depends_on=["flight"])
                    .step("car", agent="book", depends_on=["hotel"]))

#: A step compensated by its tool calls' own compensating tool (``@app.tool(compensate="release")``).
SHOW = app.pipeline(Pipeline("show")
                    .step("seat", agent="seats")
                    .step("car", agent="book", depends_on=["seat"]))


@app.tool(dependency=lambda args: host_port(args.url))
def hold(ctx: ToolContext, args: Seat) -> dict:
    """Holds a seat (POST /hold): effectful, without a verifier, so a call whose outcome was never
    written leaves its step ``unknown`` until ``mesh settle``."""
    send_request(ctx, "POST", f"{args.url}/hold", json={"ref": args.seat})
    return {"seat": args.seat}


@app.agent(tools=["hold"])
def holds(ctx: Context, booking: Booking) -> Booking:
    """Holds seat ``ctx.step_id`` through the ``hold`` tool."""
    ctx.call("hold", {"url": booking.url, "seat": ctx.step_id})
    return Booking(url=booking.url, ref=ctx.step_id)


#: ``held`` (compensated by ``unbook``) and ``other`` side by side: ``other`` can fail for good
#: while ``held``'s effect is unknown.
PAIR = app.pipeline(Pipeline("pair")
                    .step("held", agent="holds", compensate=UNDO)
                    .step("other", agent="book"))


class Pinned(BaseModel):
    """Args with an alias (``json``, as ``http_post``'s): a call is kept and undone by its wire names."""

    model_config = ConfigDict(extra="forbid")

    url: str
    body: dict = Field(default_factory=dict, alias="json")


@app.tool(dependency=lambda args: host_port(args.url), compensate="unpin")
def pin(ctx: ToolContext, args: Pinned) -> dict:
    """Pins ``args.body`` (POST /pin); ``unpin`` undoes it."""
    send_request(ctx, "POST", f"{args.url}/pin", json=args.body)
    return {"pinned": args.body}


@app.tool(dependency=lambda args: host_port(args.url))
def unpin(ctx: ToolContext, args: Pinned) -> dict:
    """Unpins ``args.body`` (POST /unpin), given the args ``pin`` was called with."""
    send_request(ctx, "POST", f"{args.url}/unpin", json=args.body)
    return {"unpinned": args.body}


@app.agent(tools=["pin"])
def pins(ctx: Context, booking: Booking) -> Booking:
    """Pins ``ctx.step_id`` through the ``pin`` tool (its tool's own compensation)."""
    ctx.call("pin", {"url": booking.url, "json": {"ref": ctx.step_id}})
    return Booking(url=booking.url, ref=ctx.step_id)


PINS = app.pipeline(Pipeline("pins")
                    .step("pin", agent="pins")
                    .step("car", agent="book", depends_on=["pin"]))


#: ``flight`` undone by a declared tool named in the pipeline (``compensate: {tool: release}``).
RELEASED = app.pipeline(Pipeline("released")
                        .step("flight", agent="book",
                              compensate={"tool": "release", "input": {"url": "output.url", "seat": "output.ref"}})
                        .step("car", agent="book", depends_on=["flight"]))
