"""The basket display (contract §4): ``GET /display/{basket_id}``, a page fed live by Server-Sent Events.

The agent's worker thread hands every recommendation it publishes (or the empty
payload that clears a basket on checkout or expiry) to :meth:`DisplayHub.publish`
through :meth:`agent.service.AgentService.add_answer_listener`, right after the
MQTT publish. The hub keeps each basket's latest payload — the equivalent of the
retained MQTT message — and wakes the browsers watching that basket, which then
get the payload on ``GET /display/{basket_id}/events`` (``text/event-stream``):

* ``event: recommendations`` — ``data`` is the agent's payload (contract §3.2);
* ``event: cleared`` — the basket checked out or expired: show nothing stale;
* ``event: waiting`` — nothing known for this basket (yet): sent on connect when
  the hub holds nothing, e.g. right after the agent restarted.

The worker thread never waits for a browser: each subscriber holds one slot that
a new payload overwrites (a slow or dead browser only ever misses intermediate
states, and costs at most one payload of memory), and the event loop is woken at
most once per pending slot. Everything else is bounded too: baskets remembered
(least recently answered forgotten first) and concurrent subscribers.

The page is one self-contained HTML document (no CDN, no build step: a basket
has no internet): large type, high contrast, Hangul through the system's CJK
fonts, product names inserted with ``textContent`` only. ``EventSource``
reconnects by itself (the stream's ``retry:`` hint); when the browser gives up
(the agent answered an error while restarting) the page opens a new one.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from .topics import validate_id

_LOG = logging.getLogger(__name__)

__all__ = ["DisplayHub", "Subscriber", "add_display_routes", "DISPLAY_HTML", "CLOSED", "EMPTY"]

#: handed to a subscriber when nothing is known for its basket (waiting / cleared)
EMPTY = b""


class _Closed:
    """Sentinel: the hub is shutting down; streams end so the HTTP server can stop at once."""

    def __repr__(self) -> str:
        return "CLOSED"


CLOSED = _Closed()
_NOTHING = object()  # the slot is empty: nothing new since the last get()


class Subscriber:
    """One browser watching one basket: a single overwrite-only slot, read from the event loop."""

    def __init__(self, basket_id: str, loop: asyncio.AbstractEventLoop, initial: bytes) -> None:
        self.basket_id = basket_id
        self._loop = loop
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._slot: Any = initial  # the current state goes out first
        self._wake_scheduled = False
        self._event.set()
        self.dropped = 0  # states overwritten before the browser got them

    def offer(self, item: bytes | _Closed) -> None:
        """Put ``item`` in the slot (any thread); never blocks, never queues more than one item.

        A closed hub's CLOSED is never overwritten by a later payload.
        """
        with self._lock:
            if self._slot is CLOSED:
                return
            if self._slot is not _NOTHING:
                self.dropped += 1
            self._slot = item
            if self._wake_scheduled:
                return  # the loop has a wake-up pending already: the callback queue stays bounded
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: the server is gone, nobody reads this slot
            _LOG.debug("display subscriber for %s: event loop closed", self.basket_id)

    def _wake(self) -> None:  # event loop thread
        with self._lock:
            self._wake_scheduled = False
        self._event.set()

    async def get(self, timeout: float) -> bytes | _Closed | None:
        """The newest item, or None when nothing came within ``timeout`` seconds (time for a heartbeat)."""
        while True:
            with self._lock:
                item, self._slot = self._slot, (CLOSED if self._slot is CLOSED else _NOTHING)
                if item is _NOTHING:
                    self._event.clear()
            if item is not _NOTHING:
                return item  # type: ignore[no-any-return]
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                return None


class DisplayHub:
    """Each basket's latest answer and the browsers watching it; fed by the agent's worker thread."""

    def __init__(self, *, max_baskets: int = 10000, max_subscribers: int = 1000) -> None:
        if max_baskets < 1 or max_subscribers < 1:
            raise ValueError("max_baskets and max_subscribers must be positive")
        self.max_baskets, self.max_subscribers = max_baskets, max_subscribers
        self._lock = threading.Lock()
        self._latest: OrderedDict[str, bytes] = OrderedDict()  # least recently answered first
        self._subs: dict[str, set[Subscriber]] = {}
        self._n_subs = 0
        self._closed = False

    # -- the worker thread's side ----------------------------------------------------------
    def publish(self, basket_id: str, payload: bytes) -> None:
        """Record ``basket_id``'s newest payload (b"" = cleared) and wake its watchers. Never blocks.

        Signature of an :meth:`~agent.service.AgentService.add_answer_listener` listener.
        """
        with self._lock:
            if payload:
                self._latest[basket_id] = payload
                self._latest.move_to_end(basket_id)
                while len(self._latest) > self.max_baskets:
                    self._latest.popitem(last=False)
            else:
                self._latest.pop(basket_id, None)
            subs = tuple(self._subs.get(basket_id, ()))
        for sub in subs:
            sub.offer(payload)

    # -- the HTTP side ---------------------------------------------------------------------
    def latest(self, basket_id: str) -> bytes | None:
        with self._lock:
            return self._latest.get(basket_id)

    def baskets(self) -> list[str]:
        """Baskets with recommendations now, most recently answered first."""
        with self._lock:
            return list(reversed(self._latest))

    @property
    def subscribers(self) -> int:
        return self._n_subs

    def subscribe(self, basket_id: str, loop: asyncio.AbstractEventLoop) -> Subscriber | None:
        """A subscriber primed with the basket's current state; None when the hub is full or closed."""
        with self._lock:
            if self._closed or self._n_subs >= self.max_subscribers:
                return None
            sub = Subscriber(basket_id, loop, self._latest.get(basket_id, EMPTY))
            self._subs.setdefault(basket_id, set()).add(sub)
            self._n_subs += 1
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            subs = self._subs.get(sub.basket_id)
            if subs is None or sub not in subs:
                return
            subs.discard(sub)
            self._n_subs -= 1
            if not subs:
                del self._subs[sub.basket_id]

    def close(self) -> None:
        """End every stream (the HTTP server is stopping: open streams would hold its shutdown)."""
        with self._lock:
            self._closed = True
            subs = [s for group in self._subs.values() for s in group]
        for sub in subs:
            sub.offer(CLOSED)


_SSE_LINES = re.compile(r"\r\n|\r|\n")


def _sse(event: str, data: str) -> str:
    # A JSON text holds no raw newline, but SSE would split it at one: one data line per line. Only CR and LF
    # end a line in SSE: str.splitlines() also splits at U+2028, U+2029 and U+0085, which orjson writes as
    # they are (an event id or a product name holding one froze the display on its previous answer).
    lines = _SSE_LINES.split(data)
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


#: what the page shows of an answer; the rest (the member's user_id, seq, ts) stays off the unauthenticated stream
_SHOWN = ("items", "recommendations", "model", "model_version", "event_id")


def _event_for(payload: bytes, first: bool) -> str:
    if payload:
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = None
        shown = {k: answer[k] for k in _SHOWN if k in answer} if isinstance(answer, dict) else {}
        return _sse("recommendations", json.dumps(shown, ensure_ascii=False, separators=(",", ":")))
    return _sse("waiting" if first else "cleared", "{}")


def add_display_routes(app: FastAPI, hub: DisplayHub, *, heartbeat_s: float = 15.0, retry_ms: int = 1000) -> None:
    """Register ``GET /display`` (index), ``/display/{basket_id}`` (page) and ``.../events`` (SSE) on ``app``.

    The hub is kept as ``app.state.display_hub``: :meth:`agent.http.HttpBridge.stop`
    closes it, since open streams would otherwise hold the server's shutdown.
    """
    app.state.display_hub = hub

    @app.get("/display", response_class=HTMLResponse)
    def display_index() -> HTMLResponse:
        links = "".join(f'<li><a href="display/{html.escape(b, quote=True)}">{html.escape(b)}</a></li>'
                        for b in hub.baskets()[:500])
        body = links and f"<ul>{links}</ul>" or "<p>No basket has recommendations right now.</p>"
        return HTMLResponse(_INDEX_HTML.replace("{{BODY}}", body), headers=_NO_CACHE)

    @app.get("/display/{basket_id}", response_class=HTMLResponse)
    def display_page(basket_id: str) -> Response:
        try:
            validate_id("basket id", basket_id)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        return HTMLResponse(DISPLAY_HTML, headers=_NO_CACHE)  # the page reads its basket id from the URL

    @app.get("/display/{basket_id}/events")
    async def display_events(basket_id: str, request: Request) -> Response:
        try:
            validate_id("basket id", basket_id)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        sub = hub.subscribe(basket_id, asyncio.get_running_loop())
        if sub is None:
            return JSONResponse({"error": "too many display connections, or shutting down"}, status_code=503,
                                headers={"Retry-After": "5"})
        return StreamingResponse(_stream(hub, sub, heartbeat_s, retry_ms), media_type="text/event-stream",
                                 headers={**_NO_CACHE, "X-Accel-Buffering": "no"})


async def _stream(hub: DisplayHub, sub: Subscriber, heartbeat_s: float, retry_ms: int) -> AsyncIterator[str]:
    """The event stream of one browser: retry hint, current state, then changes and heartbeats."""
    first = True
    try:
        yield f"retry: {int(retry_ms)}\n\n"
        while True:
            item = await sub.get(heartbeat_s)
            if item is CLOSED:
                return
            if item is None:
                yield ": ping\n\n"  # keeps proxies and NAT from closing an idle stream; shows a dead peer
                continue
            assert isinstance(item, bytes)
            yield _event_for(item, first)
            first = False
    finally:
        hub.unsubscribe(sub)


_NO_CACHE = {"Cache-Control": "no-cache, no-store"}

_INDEX_HTML = """<!doctype html>
<html lang="ko"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Smart Basket displays</title>
<style>body{font-family:"Noto Sans CJK KR","Noto Sans KR","Apple SD Gothic Neo","Malgun Gothic",system-ui,sans-serif;
margin:2rem;color:#111;background:#fff;font-size:1.4rem}a{color:#0b3d91}li{margin:.4rem 0}</style></head>
<body><h1>Basket displays · 장바구니 화면</h1>{{BODY}}
<p style="color:#555;font-size:1rem">Open <code>/display/&lt;basket id&gt;</code> on the basket's screen.</p>
</body></html>
"""

#: The display page: one document, no external resources. The basket id comes from the URL.
DISPLAY_HTML = """<!doctype html>
<html lang="ko">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Smart Basket</title>
<style>
  :root { --ink: #111; --muted: #4a4a4a; --paper: #fff; --accent: #0b3d91; --ok: #0a7d32; --warn: #b35900; }
  * { box-sizing: border-box; }
  html, body { margin: 0; height: 100%; }
  body {
    font-family: "Noto Sans CJK KR", "Noto Sans KR", "Apple SD Gothic Neo", "Malgun Gothic", system-ui, sans-serif;
    color: var(--ink); background: var(--paper); display: flex; flex-direction: column;
    font-size: clamp(16px, 2.6vw, 28px); line-height: 1.25;
  }
  header { display: flex; align-items: center; gap: .6em; padding: .5em .8em; background: var(--accent); color: #fff; }
  header h1 { font-size: 1.35em; margin: 0; flex: 1; font-weight: 700; }
  header .basket { font-size: .85em; opacity: .9; }
  .link { display: inline-flex; align-items: center; gap: .3em; font-size: .75em; padding: .15em .6em;
          border-radius: 1em; background: #fff; color: var(--ink); font-weight: 700; }
  .link::before { content: ""; width: .7em; height: .7em; border-radius: 50%; background: var(--warn); }
  .link.live::before { background: var(--ok); }
  main { flex: 1; padding: .6em .8em; overflow: hidden; }
  ol { list-style: none; margin: 0; padding: 0; display: grid; gap: .45em;
       grid-template-columns: repeat(auto-fill, minmax(min(100%, 14em), 1fr)); counter-reset: rank; }
  li.item { counter-increment: rank; display: flex; align-items: baseline; gap: .5em; padding: .45em .6em;
            border: 3px solid #d0d7e2; border-radius: .4em; background: #f5f8fc; min-width: 0; }
  li.item::before { content: counter(rank); font-weight: 700; color: var(--accent); min-width: 1.2em; }
  li.item .name { font-size: 1.5em; font-weight: 700; overflow-wrap: anywhere; }
  li.item .pid { font-size: .7em; color: var(--muted); margin-left: auto; white-space: nowrap; }
  body.stale ol { opacity: .35; }
  .message { display: none; text-align: center; margin-top: 12vh; }
  .message p { margin: .3em 0; }
  .message .ko { font-size: 2em; font-weight: 700; }
  .message .en { font-size: 1.3em; color: var(--muted); }
  body[data-state="waiting"] #waiting, body[data-state="cleared"] #cleared { display: block; }
  body[data-state="waiting"] ol, body[data-state="cleared"] ol { display: none; }
  footer { padding: .35em .8em; font-size: .7em; color: var(--muted); border-top: 2px solid #e3e7ee;
           display: flex; gap: 1.2em; flex-wrap: wrap; }
</style>
</head>
<body data-state="connecting">
<header>
  <h1>추천 상품 · Recommended for you</h1>
  <span class="basket" id="basket"></span>
  <span class="link" id="link">연결 중 · connecting</span>
</header>
<main>
  <ol id="items" aria-live="polite"></ol>
  <div class="message" id="waiting"><p class="ko">상품을 담으면 추천이 나타나요</p>
    <p class="en">Add a product to see suggestions</p></div>
  <div class="message" id="cleared"><p class="ko">감사합니다!</p>
    <p class="en">Thank you &mdash; basket checked out</p></div>
</main>
<footer><span id="model"></span><span id="version"></span><span id="updated"></span></footer>
<script>
(function () {
  "use strict";
  var path = location.pathname.replace(/\\/+$/, "");
  var basket = decodeURIComponent(path.slice(path.lastIndexOf("/") + 1));
  var $ = function (id) { return document.getElementById(id); };
  var list = $("items"), link = $("link");
  $("basket").textContent = basket;
  document.title = "Smart Basket " + basket;

  function text(node, value) { node.textContent = value == null ? "" : String(value); }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
  function footer(p) {
    var who = p && p.model === "member" ? "회원 맞춤 · member" : p ? "추천 · guest" : "";
    text($("model"), who);
    text($("version"), p && p.model_version ? "model " + p.model_version : "");
    text($("updated"), p ? "updated " + new Date().toLocaleTimeString() : "");
  }
  function setState(state) { document.body.setAttribute("data-state", state); }

  function render(p) {
    var items = Array.isArray(p.items) ? p.items : (p.recommendations || []).map(function (id) {
      return { id: id, name: null };
    });
    clear(list);
    items.forEach(function (it) {
      var li = document.createElement("li"), name = document.createElement("span"),
          pid = document.createElement("span");
      li.className = "item";
      li.setAttribute("data-id", String(it.id));
      name.className = "name";
      pid.className = "pid";
      text(name, it.name || it.id);  // textContent only: names are data, never markup
      text(pid, it.id);
      li.appendChild(name);
      li.appendChild(pid);
      list.appendChild(li);
    });
    list.setAttribute("data-event", p.event_id == null ? "" : String(p.event_id));
    setState(items.length ? "live" : "waiting");
    footer(p);
  }
  function empty(state) { clear(list); list.setAttribute("data-event", ""); setState(state); footer(null); }
  function online(yes) {
    link.className = yes ? "link live" : "link";
    text(link, yes ? "실시간 · live" : "다시 연결 중 · reconnecting");
    document.body.classList.toggle("stale", !yes);
  }

  var source = null, delay = 1000;
  function connect() {
    source = new EventSource(path + "/events");
    source.onopen = function () { delay = 1000; online(true); };
    source.addEventListener("recommendations", function (e) {
      try { render(JSON.parse(e.data)); } catch (err) { console.error("bad payload", err); }
    });
    source.addEventListener("cleared", function () { empty("cleared"); });
    source.addEventListener("waiting", function () { empty("waiting"); });
    source.onerror = function () {
      online(false);
      if (source.readyState === EventSource.CLOSED) {  // the browser gave up: start over ourselves
        source.close();
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 10000);
      }
    };
  }
  connect();
})();
</script>
</body>
</html>
"""
