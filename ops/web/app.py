"""The console's routes: pages (GET), actions (POST with a CSRF token), the live event stream of a job
(server-sent events from the server's one :class:`~.live.TraceHub`), login and logout, and the
static files. Mounted by :func:`mesh.ops.server.make_app` beside /metrics, /healthz and /readyz,
which stay open; every route here needs a user (see :class:`~.auth.Access`).

Every page is rendered by Jinja2 with autoescaping, under a Content-Security-Policy that allows
scripts and styles from this server only (no inline script), so a hostile key, error text or
payload shows as text and runs nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import anyio.to_thread
import jinja2
import orjson
import redis
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from mesh.broker import MeshClient
from mesh.dlq import Filter
from mesh.ops.timeline import event_line

from . import actions, views
from .auth import LOGIN_COOKIE, SESSION_COOKIE, Access, Throttle, same_token, session_id
from .live import CUT, END, Follower, TraceHub
from .rates import Rates, read

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent

#: The largest form body read (the note of an approval is the longest field).
MAX_FORM_BYTES = 64 * 1024

#: Password checks run at once.
LOGIN_CHECKS = 2

#: A comment line sent on an idle event stream this often, so a dead browser is noticed.
KEEPALIVE_S = 15.0

#: How often an open event stream checks that its session still holds (see Console.session_check_s).
SESSION_CHECK_S = 5.0

#: How long one write of an event stream may wait for the browser to take it: one that stops reading
#: (its socket's buffers full) is dropped then, rather than holding its stream and its events for good.
SEND_TIMEOUT_S = 30.0

HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

#: What an action's redirect says on the next page (a fixed text per code: nothing from the URL is shown).
DONE = {"replayed": "Replayed: the entry is back on its queue.", "purged": "Purged: the entry is deleted.",
        "approved": "Approved.", "denied": "Denied.", "reset": "Breaker reset: it is closed.",
        "verified": "Verified: the effect happened; the step runs again, its calls answered from the ledger.",
        "checked": "Checked again: see the step's state for the verdict.",
        "settled": "Settled: the decision is recorded and the step moves on by it.",
        "limit-set": "Limit set for the whole fleet: workers take it within a second.",
        "limit-reset": "Limit reset: its declaration is in force again."}

Handler = Callable[[Request, "Console", str, str], Awaitable[Response]]


def _clock(ts: float | None) -> str:
    return "-" if not ts else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


class Console:
    """The console's state: the client, the access rule, the trace hub and the templates."""

    def __init__(self, client: MeshClient, access: Access) -> None:
        self.client = client
        self.access = access
        self.hub = TraceHub(client)
        self.rates = Rates(client)
        #: Event streams held open at once: half the server's connections, so following browsers
        #: never take the room /healthz and the pages need.
        self.max_streams = max(1, client.settings.ops_max_connections // 2)
        self.streams = 0
        self.send_timeout_s = SEND_TIMEOUT_S
        #: How often an open event stream looks again at its session: one logged out or expired meanwhile
        #: ends its streams too (else they would go on for as long as their jobs run).
        self.session_check_s = SESSION_CHECK_S
        #: Password checks at once (scrypt: 16 MiB and ~50 ms each); more wait on the event loop,
        #: not on the threads Redis reads need.
        self.checking: asyncio.Semaphore | None = None
        #: Failed logins per name and per address: guessing is slowed to a few tries a minute.
        self.throttle = Throttle()
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      undefined=jinja2.StrictUndefined)
        self.env.filters["clock"] = _clock
        self.env.filters["cut"] = views.cut
        self.env.filters["html"] = lambda text: Markup(views.html(text))

    def render(self, request: Request, name: str, user: str, csrf: str, status: int = 200,
               **context: Any) -> HTMLResponse:
        done = DONE.get(request.query_params.get("done", ""))
        body = self.env.get_template(name).render(user=user, csrf=csrf, done=done, path=request.url.path,
                                                  login_needed=self.access.login_needed, **context)
        return HTMLResponse(body, status_code=status, headers=HEADERS)

    def stop(self) -> None:
        """End the followers' streams and the sampling (the server is stopping)."""
        self.hub.stop()
        self.rates.stop()

    def routes(self) -> list[BaseRoute]:
        page = self._guard
        return [
            Route("/", page(overview)), Route("/jobs", page(jobs)), Route("/jobs/{job_id}", page(job)),
            Route("/jobs/{job_id}/events", page(events, stream=True)),
            Route("/dlq", page(dlq)),
            Route("/dlq/all/{action}", page(dlq_bulk_confirm)),
            Route("/dlq/all/{action}", page(dlq_bulk), methods=["POST"]),
            Route("/dlq/{entry_id}", page(dlq_entry)),
            Route("/dlq/{entry_id}/{action}", page(dlq_confirm)),
            Route("/dlq/{entry_id}/{action}", page(dlq_action), methods=["POST"]),
            Route("/jobs/{job_id}/steps/{step_id}/verify", page(verify), methods=["POST"]),
            Route("/jobs/{job_id}/steps/{step_id}/settle", page(settle), methods=["POST"]),
            Route("/approvals", page(approvals_page)),
            Route("/approvals/{job_id}/{step_id}", page(decide), methods=["POST"]),
            Route("/breakers", page(breakers)),
            Route("/breakers/reset", page(reset), methods=["POST"]),
            Route("/limits", page(limits)),
            Route("/limits/set", page(limit_set), methods=["POST"]),
            Route("/limits/reset", page(limit_reset), methods=["POST"]),
            Route("/login", self.login_page), Route("/login", self.login, methods=["POST"]),
            Route("/logout", page(logout), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    def _guard(self, handler: Handler, *, stream: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the access rule: a user's session (a GET without one goes to the login
        page; anything else is refused), and for a POST the session's CSRF token in the form."""

        async def endpoint(request: Request) -> Response:
            try:
                return await guarded(request)
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # said plainly, no traceback in page or log
                logger.warning("console: redis unavailable", extra={"path": request.url.path, "error": str(exc)})
                return PlainTextResponse(f"Redis is unavailable ({type(exc).__name__}: {str(exc)[:200]}); this "
                                         "page answers again once it is back (/healthz stays up)\n",
                                         status_code=503, headers={**HEADERS, "Retry-After": "5"})

        async def guarded(request: Request) -> Response:
            off = self.access.off_reason
            if off is not None:
                return PlainTextResponse(off + "\n", status_code=403, headers=HEADERS)
            foreign = self.access.foreign_host(request.headers.get("host"))
            if foreign is not None:
                return PlainTextResponse(foreign, status_code=403, headers=HEADERS)
            session = self.access.read_session(request.cookies.get(SESSION_COOKIE))
            fresh = None
            if session is None and not self.access.login_needed and request.method == "GET":
                fresh = self.access.session(self.access.local)  # loopback without users: the local operator
                session = self.access.read_session(fresh)
            if session is not None and self.access.login_needed and await _run(self._logged_out, request):
                session = None
            if session is None:
                if request.method == "GET" and not stream:
                    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303,
                                            headers=HEADERS)
                return PlainTextResponse("log in first\n", status_code=401, headers=HEADERS)
            user, csrf = session
            if request.method == "POST":
                refused = await self._check_post(request, csrf)
                if refused is not None:
                    return refused
            response = await handler(request, self, user, csrf)
            if fresh is not None:
                _set_session(request, response, fresh)
            return response

        return endpoint

    def _logged_out(self, request: Request) -> bool:
        """Whether the request's session was logged out (the signed cookie alone would stay valid)."""
        key = self.client.keys.console_logout(session_id(request.cookies[SESSION_COOKIE]))
        return bool(self.client.redis.exists(key))

    async def _check_post(self, request: Request, csrf: str) -> Response | None:
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return PlainTextResponse("refused: the form came from another site\n", status_code=403, headers=HEADERS)
        form = await read_form(request)
        if form is None:
            return PlainTextResponse("form too large\n", status_code=413, headers=HEADERS)
        if not same_token(form.get("csrf"), csrf):
            return PlainTextResponse("refused: the form's CSRF token is missing or stale; reload the page\n",
                                     status_code=403, headers=HEADERS)
        request.state.form = form
        return None

    async def login_page(self, request: Request) -> Response:
        off = self.access.off_reason
        if off is not None:
            return PlainTextResponse(off + "\n", status_code=403, headers=HEADERS)
        if not self.access.login_needed:
            return RedirectResponse("/", status_code=303)
        token = request.cookies.get(LOGIN_COOKIE) or _token()
        response = self.render(request, "login.html", "", token, next=_next(request.query_params.get("next")),
                               error=None)
        response.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", path="/login",
                            secure=request.url.scheme == "https")
        return response

    async def login(self, request: Request) -> Response:
        if self.access.off_reason is not None or not self.access.login_needed:
            return PlainTextResponse("no login here\n", status_code=403, headers=HEADERS)
        form = await read_form(request)
        if form is None or not same_token(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            return PlainTextResponse("refused: the form's CSRF token is missing or stale; reload the page\n",
                                     status_code=403, headers=HEADERS)
        name, password = form.get("user", ""), form.get("password", "")
        address = request.client.host if request.client else "-"
        wait_s = self.throttle.wait_s(name, address)
        if wait_s > 0:
            logger.warning("console login throttled", extra={"user": name[:64], "address": address})
            page = self.render(request, "login.html", "", form["csrf"], status=429, next=_next(form.get("next")),
                               error=f"Too many failed logins; try again in {math.ceil(wait_s)}s.")
            page.headers["Retry-After"] = str(math.ceil(wait_s))
            return page
        if self.checking is None:
            self.checking = asyncio.Semaphore(LOGIN_CHECKS)
        async with self.checking:
            ok = await anyio.to_thread.run_sync(self.access.login, name, password)
        if not ok:
            self.throttle.failed(name, address)
            logger.warning("console login refused", extra={"user": name[:64], "address": address})
            return self.render(request, "login.html", "", form["csrf"], status=401, next=_next(form.get("next")),
                               error="Unknown user or wrong password.")
        logger.info("console login", extra={"user": name})
        response = RedirectResponse(_next(form.get("next")), status_code=303)
        _set_session(request, response, self.access.session(name))
        return response


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(24)


def _next(value: str | None) -> str:
    """Where to go after logging in: a path on this server only."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _set_session(request: Request, response: Response, value: str) -> None:
    response.set_cookie(SESSION_COOKIE, value, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")


async def read_form(request: Request) -> dict[str, str] | None:
    """An urlencoded form's fields (the first of each), or None past MAX_FORM_BYTES."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


async def _run(fn: Callable[..., Any], *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


# Pages -----------------------------------------------------------------------------------------


async def overview(request: Request, con: Console, user: str, csrf: str) -> Response:
    con.rates.start()
    data, now = await _run(lambda: (views.overview(con.client), read(con.client)))
    return con.render(request, "overview.html", user, csrf, rates=con.rates.view(now), **data)


async def jobs(request: Request, con: Console, user: str, csrf: str) -> Response:
    q = request.query_params.get("q", "").strip()
    state = request.query_params.get("state") or None
    if q:
        found = await _run(views.find, con.client, q)
        if found.job_id is not None:
            return RedirectResponse(f"/jobs/{quote(found.job_id)}", status_code=303)
        return con.render(request, "jobs.html", user, csrf, q=q, found=found, jobs=[], cut=False, state=None,
                          budget=views.JOB_BUDGET, states=_states(), status=404 if not found.candidates else 200)
    from mesh.contracts import State

    if state is not None and state not in set(State):
        state = None
    data = await _run(views.recent_jobs, con.client, state)
    return con.render(request, "jobs.html", user, csrf, q="", found=None, state=state, states=_states(), **data)


def _states() -> list[str]:
    from mesh.contracts import State

    return [str(s) for s in State]


async def job(request: Request, con: Console, user: str, csrf: str) -> Response:
    job_id = request.path_params["job_id"]
    data = await _run(views.job, con.client, job_id)
    if data is None:
        return con.render(request, "missing.html", user, csrf, status=404, what=f"no job {job_id}")
    return con.render(request, "job.html", user, csrf, **data)


FILTER_FIELDS = ("agent", "class", "since", "until", "grep", "key")

#: The longest DLQ filter field taken (a longer one is refused: cut, it would match more than was asked).
FILTER_CHARS = 200


def _dlq_filter(con: Console, fields: Any) -> tuple[dict[str, str], Filter | None, str | None]:
    """The DLQ filter of a query or form: (the fields as given, the filter, or why it is not one)."""
    import typer

    from mesh.contracts import FailureClass
    from mesh.ops.dlq_cli import _RELATIVE, parse_time

    given = {k: str(fields.get(k) or "").strip() for k in FILTER_FIELDS}
    shown = {k: v[:FILTER_CHARS] for k, v in given.items()}
    if long := [k for k, v in given.items() if len(v) > FILTER_CHARS]:  # cut, it would take more than asked
        return shown, None, f"the {long[0]} filter is longer than {FILTER_CHARS} characters"
    if shown["class"] and shown["class"] not in set(FailureClass):
        return shown, None, f"no failure class {shown['class']}"
    relative = any(_RELATIVE.match(shown[k]) for k in ("since", "until"))
    now = con.client.clock.now_s() if relative else None  # dead letters are timed on the Redis server's clock
    try:
        since, until = (parse_time(shown[k] or None, now=now) for k in ("since", "until"))
    except typer.BadParameter as exc:
        return shown, None, str(exc.message)
    return shown, Filter(agent=shown["agent"] or None, failure_class=shown["class"] or None, since=since,
                         until=until, grep=shown["grep"] or None, key=shown["key"] or None), None


async def dlq(request: Request, con: Console, user: str, csrf: str) -> Response:
    p = request.query_params
    shown, flt, problem = await _run(_dlq_filter, con, p)
    start = p.get("from", "0")
    offset = min(int(start), 2**31) if start.isascii() and start.isdigit() and len(start) < 12 else 0
    data, audit = await _run(lambda: (views.dlq(con.client, flt or Filter(), offset), views.audit_log(con.client)))
    if problem is not None:
        data["entries"], data["cut"] = [], False
    from mesh.contracts import FailureClass

    more = {k: v for k, v in shown.items() if v}
    return con.render(request, "dlq.html", user, csrf, f=shown, classes=[str(c) for c in FailureClass],
                      audit=audit, more=more, problem=problem, status=400 if problem else 200, **data)


async def dlq_bulk_confirm(request: Request, con: Console, user: str, csrf: str) -> Response:
    """The confirmation step of replaying or purging every entry a filter takes, with its count."""
    action = request.path_params["action"]
    if action not in ("replay", "purge"):
        return con.render(request, "missing.html", user, csrf, status=404, what="no such page")
    shown, flt, problem = await _run(_dlq_filter, con, request.query_params)
    if flt is None:
        return con.render(request, "refused.html", user, csrf, status=400, why=problem)
    # What is confirmed is what the filter takes now: the form carries this moment (on the Redis
    # clock, which times dead letters) as its `until`, and a relative `since` as the time it is now,
    # so a press, or a second press of the same form, never takes an entry dead-lettered after the
    # confirmation (one that arrived meanwhile, or a replayed entry failing again).
    at = await _run(con.client.clock.now_s)
    flt = dataclasses.replace(flt, until=at if flt.until is None else min(flt.until, at))
    count = await _run(lambda: views.DeadLetterShards.of(con.client.redis, con.client.settings).count(flt))
    more = {k: v for k, v in shown.items() if v}
    form = {**more, "until": repr(flt.until), **({"since": repr(flt.since)} if flt.since is not None else {})}
    return con.render(request, "dlq_bulk.html", user, csrf, action=action, f=shown, count=count,
                      bulk_max=actions.BULK_MAX, exact=flt.exact, more=more, form=form, at=at)


async def dlq_bulk(request: Request, con: Console, user: str, csrf: str) -> Response:
    action = request.path_params["action"]
    if action not in ("replay", "purge"):
        return PlainTextResponse("no such action\n", status_code=404, headers=HEADERS)
    shown, flt, problem = await _run(_dlq_filter, con, request.state.form)
    if flt is None:
        return con.render(request, "refused.html", user, csrf, status=400, why=problem)
    if action == "replay":
        done, skipped = await _run(actions.replay_filter, con.client, flt, user)
    else:
        done, skipped = await _run(actions.purge_filter, con.client, flt, user), {}
    left = await _run(lambda: views.DeadLetterShards.of(con.client.redis, con.client.settings).count(flt))
    return con.render(request, "dlq_bulk_done.html", user, csrf, action=action, moved=done, left=left,
                      exact=flt.exact, skipped=list(skipped.items())[:views.PAGE_ROWS],
                      more_skipped=max(0, len(skipped) - views.PAGE_ROWS), bulk_max=actions.BULK_MAX,
                      more={k: v for k, v in shown.items() if v})


async def dlq_entry(request: Request, con: Console, user: str, csrf: str) -> Response:
    entry_id = request.path_params["entry_id"]
    data = await _run(views.dlq_entry, con.client, entry_id)
    if data is None:
        return con.render(request, "missing.html", user, csrf, status=404, what=f"no dead letter {entry_id}")
    return con.render(request, "dlq_entry.html", user, csrf, entry_id=entry_id, **data)


async def dlq_confirm(request: Request, con: Console, user: str, csrf: str) -> Response:
    """The confirmation step of a replay or purge: what will happen, and the button that does it."""
    entry_id, action = request.path_params["entry_id"], request.path_params["action"]
    if action not in ("replay", "purge"):
        return con.render(request, "missing.html", user, csrf, status=404, what="no such page")
    data = await _run(views.dlq_entry, con.client, entry_id)
    if data is None or "entry" not in data:
        return con.render(request, "missing.html", user, csrf, status=404, what=f"no dead letter {entry_id}")
    return con.render(request, "dlq_confirm.html", user, csrf, entry_id=entry_id, action=action, **data)


async def dlq_action(request: Request, con: Console, user: str, csrf: str) -> Response:
    entry_id, action = request.path_params["entry_id"], request.path_params["action"]
    if action not in ("replay", "purge"):
        return PlainTextResponse("no such action\n", status_code=404, headers=HEADERS)
    try:
        if action == "replay":
            job_id = await _run(actions.replay, con.client, entry_id, user)
            return RedirectResponse(f"/jobs/{quote(job_id)}?done=replayed" if job_id else
                                    f"/dlq/{quote(entry_id)}?done=replayed", status_code=303)
        await _run(actions.purge, con.client, entry_id, user)
    except actions.Refused as exc:
        return con.render(request, "refused.html", user, csrf, status=exc.status, why=str(exc))
    return RedirectResponse("/dlq?done=purged", status_code=303)


async def approvals_page(request: Request, con: Console, user: str, csrf: str) -> Response:
    waiting = await _run(views.pending, con.client)
    return con.render(request, "approvals.html", user, csrf, waiting=waiting)


async def decide(request: Request, con: Console, user: str, csrf: str) -> Response:
    form = request.state.form
    job_id, step_id = request.path_params["job_id"], request.path_params["step_id"]
    approve = form.get("decision") == "approve"
    try:
        await _run(lambda: actions.decide(con.client, job_id, step_id, user, approve=approve,
                                          note=form.get("note", "")))
    except actions.Refused as exc:
        return con.render(request, "refused.html", user, csrf, status=exc.status, why=str(exc))
    back = _next(form.get("back")) if form.get("back") else "/approvals"
    sep = "&" if "?" in back else "?"
    return RedirectResponse(f"{back}{sep}done={'approved' if approve else 'denied'}", status_code=303)


async def verify(request: Request, con: Console, user: str, csrf: str) -> Response:
    job_id, step_id = request.path_params["job_id"], request.path_params["step_id"]
    try:
        verdict = await _run(actions.verify, con.client, job_id, step_id, user)
    except actions.Refused as exc:
        return con.render(request, "refused.html", user, csrf, status=exc.status, why=str(exc))
    return RedirectResponse(f"/jobs/{quote(job_id)}?done={'verified' if verdict == 'verified' else 'checked'}",
                            status_code=303)


async def settle(request: Request, con: Console, user: str, csrf: str) -> Response:
    form = request.state.form
    job_id, step_id = request.path_params["job_id"], request.path_params["step_id"]
    applied = form.get("as") == "applied"
    if form.get("as") not in ("applied", "not-applied"):
        return con.render(request, "refused.html", user, csrf, status=400, why="settle as applied or not-applied")
    try:
        await _run(lambda: actions.settle(con.client, job_id, step_id, user, applied=applied,
                                          reason=form.get("reason", "")))
    except actions.Refused as exc:
        return con.render(request, "refused.html", user, csrf, status=exc.status, why=str(exc))
    return RedirectResponse(f"/jobs/{quote(job_id)}?done=settled", status_code=303)


async def breakers(request: Request, con: Console, user: str, csrf: str) -> Response:
    data = await _run(views.breakers, con.client)
    return con.render(request, "breakers.html", user, csrf, **data)


async def reset(request: Request, con: Console, user: str, csrf: str) -> Response:
    name = request.state.form.get("name", "")
    try:
        await _run(actions.reset_breaker, con.client, name, user)
    except actions.Refused as exc:
        return con.render(request, "refused.html", user, csrf, status=exc.status, why=str(exc))
    return RedirectResponse("/breakers?done=reset", status_code=303)


async def limits(request: Request, con: Console, user: str, csrf: str) -> Response:
    data = await _run(views.limits, con.client)
    return con.render(request, "limits.html", user, csrf, **data)


async def limit_set(request: Request, con: Console, user: str, csrf: str) -> Response:
    form = request.state.form
    try:
        await _run(lambda: actions.set_limit(con.client, form.get("name", ""), user, requests=form.get("requests", ""),
                                             tokens=form.get("tokens", ""), max=form.get("max", "")))
    except actions.Refused as exc:
        return con.render(request, "refused.html", user, csrf, status=exc.status, why=str(exc))
    return RedirectResponse("/limits?done=limit-set", status_code=303)


async def limit_reset(request: Request, con: Console, user: str, csrf: str) -> Response:
    try:
        await _run(actions.reset_limit, con.client, request.state.form.get("name", ""), user)
    except actions.Refused as exc:
        return con.render(request, "refused.html", user, csrf, status=exc.status, why=str(exc))
    return RedirectResponse("/limits?done=limit-reset", status_code=303)


async def logout(request: Request, con: Console, user: str, csrf: str) -> Response:
    value = request.cookies.get(SESSION_COOKIE)
    if con.access.login_needed and value:  # refused from now on, wherever a copy of the cookie is
        key = con.client.keys.console_logout(session_id(value))
        await _run(lambda: con.client.redis.set(key, user, ex=int(con.access.session_s) + 1))
    response = RedirectResponse("/login" if con.access.login_needed else "/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# The live stream -------------------------------------------------------------------------------


async def events(request: Request, con: Console, user: str, csrf: str) -> Response:
    """``text/event-stream`` of the job's trace: each event after the browser's Last-Event-ID (or
    ``?after=``), as it happens, then ``end`` once the job has ended (and only then: a stream cut off
    or closed by a stopping server just closes, and the browser reconnects from its last id)."""
    job_id = request.path_params["job_id"]
    after = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not _event_id(after):
        after = "0"
    if con.streams >= con.max_streams:
        return PlainTextResponse(f"{con.max_streams} event streams are open already; reload later\n",
                                 status_code=503, headers={**HEADERS, "Retry-After": "10"})
    follower = Follower(job_id, after, asyncio.get_running_loop())
    con.streams += 1  # taken now (the event loop's thread alone counts), given back when the response ends

    def release() -> None:
        con.streams -= 1

    async def still_in() -> bool:
        """Whether the stream's session is still good (not expired, its user there, not logged out)."""
        if con.access.read_session(request.cookies.get(SESSION_COOKIE)) is None:
            return False
        try:
            return not await _run(con._logged_out, request)
        except (redis.ConnectionError, redis.TimeoutError):  # Redis away: the stream waits, as its reader does
            return True

    async def stream() -> AsyncIterator[bytes]:
        # followed once the stream runs: a response never started leaves no follower behind
        con.hub.follow(follower)
        loop = asyncio.get_running_loop()
        checked = sent = loop.time()
        try:
            yield b"retry: 2000\n\n"
            while True:
                try:
                    event_id, ev = await asyncio.wait_for(follower.queue.get(),
                                                          min(KEEPALIVE_S, con.session_check_s))
                except TimeoutError:
                    event_id, ev = "", None
                if con.access.login_needed and loop.time() - checked >= con.session_check_s:
                    checked = loop.time()
                    if not await still_in():  # logged out (or expired) since the stream opened: it ends too
                        return
                if ev is None:
                    if loop.time() - sent >= KEEPALIVE_S:
                        sent = loop.time()
                        yield b": keep-alive\n\n"
                    continue
                sent = loop.time()
                if ev is END:
                    yield b"event: end\ndata: {}\n\n"
                    return
                if ev is CUT:  # closed, the job not ended: the browser reconnects from its last id
                    return
                data = {"event": str(ev.get("event")), "step": str(ev.get("step_id")),
                        "line": _line(ev)[:views.LINE_CHARS], "style": _style(ev)}
                yield f"id: {event_id}\ndata: ".encode() + orjson.dumps(data) + b"\n\n"
        finally:
            con.hub.leave(follower)

    return EventStream(stream(), con.send_timeout_s, release, media_type="text/event-stream",
                       headers={**HEADERS, "X-Accel-Buffering": "no"})


class EventStream(StreamingResponse):
    """A stream each of whose writes must be taken within ``send_timeout_s``; past it the stream ends
    and its connection is closed (a browser that comes back resumes from its last event id)."""

    def __init__(self, content: AsyncIterator[bytes], send_timeout_s: float, release: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.send_timeout_s = send_timeout_s
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()

    async def stream_response(self, send: Callable[[Any], Awaitable[None]]) -> None:
        async def timed(message: Any) -> None:
            await asyncio.wait_for(send(message), self.send_timeout_s)

        try:
            await super().stream_response(timed)
        except TimeoutError:
            logger.warning("event stream dropped: the browser stopped reading",
                           extra={"timeout_s": self.send_timeout_s})
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _line(ev: dict[str, Any]) -> str:
    """The event as ``mesh trace --follow`` prints it, or its raw fields when they are not what an
    event of its kind holds (a stream that failed on an event would be resumed at it for ever)."""
    try:
        return event_line(ev).plain
    except (TypeError, ValueError, AttributeError, KeyError):
        return f"{ev.get('event')}: {orjson.dumps(ev, default=str).decode()[:500]}"


def _style(ev: dict[str, Any]) -> str:
    from mesh.ops.timeline import _STYLE

    return _STYLE.get(str(ev.get("event")), "")


def _event_id(value: str) -> bool:
    """Whether ``value`` is a stream id Redis takes: one past its range would fail the shared XREAD of
    every followed job."""
    ms, _, seq = value.partition("-")
    return (ms.isascii() and ms.isdigit() and int(ms) < 2**64
            and (not seq or (seq.isascii() and seq.isdigit() and int(seq) < 2**64)))
