"""The store operations console (contract §9), served on ``retrain-server serve``'s HTTP port.

* :class:`AgentDirectory` — every agent seen on ``PREFIX/agent/+/status``
  (retained, with the agents' Last Will), kept from one MQTT subscription: state,
  since when (as far as this process saw it change), when last heard of, models,
  last update, stats. An offline agent keeps the models and stats it last
  reported, so the console still says what it was serving.
* :func:`add_console_routes` — ``GET /`` (one self-contained HTML page: tables
  and an inline SVG plot drawn by the page's script; no CDN, no build step),
  ``GET /api/agents``, ``GET /api/models`` (``retrain_server.state.model_history``
  rows) and ``GET /api/console`` (is the directory connected to the broker).

Read-only: nothing here writes, and nothing secret is shown (no DSN, no broker
credentials, no bundle URLs). The port binds to 127.0.0.1 unless configured
otherwise (``http.host``).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse

from agent.config import BrokerConfig
from agent.errors import AgentError
from agent.mqtt import Message, MqttClient
from agent.topics import validate_prefix

from .errors import DatabaseError

_LOG = logging.getLogger(__name__)

__all__ = ["AgentDirectory", "add_console_routes", "CONSOLE_HTML"]

_STATES = ("online", "offline")


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class AgentDirectory:
    """Agents' retained statuses, kept up to date by one MQTT subscription (thread-safe reads).

    ``since`` is when the agent's current state began as this process saw it: the
    arrival of the message that changed it, or None when the first message seen
    was a retained one (the change happened before the console started).
    ``seen_at`` is when the newest status arrived.
    """

    def __init__(self, broker: BrokerConfig | str, port: int | None = None, *, prefix: str = "smartbasket",
                 max_agents: int = 10000, clock: Callable[[], datetime] = _utc_now, **fields: Any) -> None:
        """``broker``: a :class:`~agent.config.BrokerConfig`, or a host name with ``port`` and other
        BrokerConfig ``fields`` (``protocol``, ``username``, ``password``, ``tls``, ``keepalive``)."""
        if not isinstance(broker, BrokerConfig):
            broker = BrokerConfig(broker, **({} if port is None else {"port": port}), **fields)
        elif port is not None or fields:
            raise TypeError("AgentDirectory: give a BrokerConfig or a host with its fields, not both")
        self.prefix = validate_prefix(prefix)
        self.subscription = f"{self.prefix}/agent/+/status"
        self.max_agents, self.clock = max_agents, clock
        self._lock = threading.Lock()
        self._agents: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # a live view: after a broker outage, retry at least every 10 s
        self.mqtt = MqttClient.for_broker(broker, client_id=f"smartbasket-console-{secrets.token_hex(4)}",
                                          reconnect_max_s=min(broker.reconnect_max_s, 10.0),
                                          subscriptions=[(self.subscription, 1)], queue_size=10000)

    @classmethod
    def from_config(cls, cfg: Any) -> AgentDirectory:
        """From a :class:`~retrain_server.config.RetrainConfig`: its broker and prefix."""
        return cls(cfg.broker, prefix=cfg.prefix)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    def start(self) -> None:
        """Connect in the background (paho reconnects by itself) and start applying statuses."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._drain, name="console-agents", daemon=True)
        self._thread.start()
        try:
            self.mqtt.start()
        except AgentError as exc:  # the console still serves the model history without a broker
            _LOG.error("operations console: cannot follow agent statuses: %s", exc)
        _LOG.info("operations console follows %s on %s:%d", self.subscription, self.mqtt.host, self.mqtt.port)

    def stop(self) -> None:
        self._stop.set()
        self.mqtt.stop()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                msg: Message = self.mqtt.messages.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.update(msg.topic, msg.payload, retained=msg.retain)
            except Exception:  # a bug here must not end the directory
                _LOG.exception("operations console: status on %s not applied", msg.topic)

    # -- the directory ---------------------------------------------------------------------
    def update(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Apply one status message (also usable without MQTT). An empty payload forgets the agent."""
        head, tail = f"{self.prefix}/agent/", "/status"
        if not (topic.startswith(head) and topic.endswith(tail)) or len(topic) <= len(head) + len(tail):
            return
        agent_id = topic[len(head):-len(tail)]
        if "/" in agent_id:
            return
        now = self.clock()
        if not payload:
            with self._lock:
                self._agents.pop(agent_id, None)
            return
        try:
            # NaN, Infinity or 1e400 would make every later /api/agents a 500 (JSON has no such numbers)
            doc = json.loads(payload, parse_constant=_no_constant, parse_float=_finite_float)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            _LOG.warning("operations console: status of %s is not a JSON object of finite numbers; ignored",
                         agent_id)
            return
        state = doc.get("state") if doc.get("state") in _STATES else "unknown"
        with self._lock:
            rec = self._agents.get(agent_id)
            if rec is None:
                rec = {"agent_id": agent_id, "state": None, "models": {}, "last_update": None, "stats": {},
                       "seen_at": None, "since": None, "status_ts": None}
                self._agents[agent_id] = rec
                while len(self._agents) > self.max_agents:
                    self._agents.popitem(last=False)
            if rec["state"] != state:
                # A retained message describes a change that happened before we subscribed: time unknown.
                rec["since"] = None if retained and rec["state"] is None else _iso(now)
                rec["state"] = state
            # The Last Will says only "offline": keep what the agent last said about itself.
            for key in ("models", "last_update", "stats"):
                if isinstance(doc.get(key), dict):
                    rec[key] = doc[key]
            rec["status_ts"] = doc.get("ts") if isinstance(doc.get("ts"), str) else rec["status_ts"]
            rec["seen_at"] = _iso(now)
            self._agents.move_to_end(agent_id)

    def agents(self) -> list[dict[str, Any]]:
        """Contract §9's ``/api/agents`` rows (plus ``since``, ``status_ts``), by agent id."""
        with self._lock:
            rows = [json.loads(json.dumps(r)) for r in self._agents.values()]  # deep copies
        return sorted(rows, key=lambda r: r["agent_id"])


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def add_console_routes(app: FastAPI, directory: AgentDirectory | None,
                       models: Callable[[], list[dict[str, Any]]] | None) -> None:
    """``GET /``, ``/api/agents``, ``/api/models``, ``/api/console`` on ``app`` (read-only).

    ``models()`` returns the nightly history (``model_history`` rows, newest first);
    when it raises, ``/api/models`` answers 503 with one line saying why.
    """

    @app.get("/", response_class=HTMLResponse)
    def console_page() -> HTMLResponse:
        return HTMLResponse(CONSOLE_HTML, headers={"Cache-Control": "no-cache"})

    @app.get("/api/agents")
    def api_agents() -> JSONResponse:
        return JSONResponse(directory.agents() if directory is not None else [])

    @app.get("/api/models")
    def api_models() -> JSONResponse:  # sync: the database call runs in the threadpool
        if models is None:
            return JSONResponse([])
        try:
            rows = models()
        except Exception as exc:
            _LOG.warning("operations console: model history unavailable: %s: %s", type(exc).__name__, exc)
            # the page is unauthenticated: the reason without the text, which may name the database's address
            why = "the database cannot be reached" if isinstance(exc, DatabaseError) else type(exc).__name__
            return JSONResponse({"error": f"model history unavailable: {why} (the server's log says more)"},
                                status_code=503)
        return JSONResponse(jsonable_encoder(rows))

    @app.get("/api/console")
    def api_console() -> JSONResponse:
        return JSONResponse({
            "prefix": directory.prefix if directory is not None else None,
            "broker_connected": bool(directory is not None and directory.connected),
            "now": _iso(_utc_now())})


#: The console page: one document, no external resources; it reads the JSON API every 5 s.
CONSOLE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Smart Basket · store operations</title>
<style>
  :root { --ink: #14181f; --muted: #5b6472; --line: #dde2ea; --ok: #0a7d32; --bad: #b3261e; --warn: #a35200;
          --guest: #1f5fbf; --member: #c2570c; }
  body { font-family: system-ui, "Noto Sans CJK KR", "Noto Sans KR", sans-serif; color: var(--ink);
         background: #f7f8fa; margin: 0; font-size: 15px; }
  header { background: #14213d; color: #fff; padding: .8em 1.2em; display: flex; gap: 1em; align-items: baseline;
           flex-wrap: wrap; }
  header h1 { font-size: 1.3em; margin: 0; flex: 1; }
  header .meta { font-size: .85em; opacity: .85; }
  main { padding: 1em 1.2em; max-width: 1400px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: .8em 1em;
            margin-bottom: 1.2em; }
  h2 { font-size: 1.1em; margin: .1em 0 .6em; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { font-size: .8em; text-transform: uppercase; letter-spacing: .03em; color: var(--muted); }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  td.num { white-space: nowrap; }
  .badge { display: inline-block; padding: .05em .55em; border-radius: 1em; font-weight: 600; font-size: .85em;
           color: #fff; background: var(--muted); }
  .badge.online, .badge.published, .badge.applied { background: var(--ok); }
  .badge.offline, .badge.refused, .badge.rejected { background: var(--bad); }
  .badge.pending, .badge.unknown { background: var(--warn); }
  .small { font-size: .82em; color: var(--muted); }
  .reason { color: var(--bad); font-size: .88em; max-width: 38em; }
  code { font-size: .9em; white-space: nowrap; }
  .nowrap { white-space: nowrap; }
  .empty { color: var(--muted); font-style: italic; }
  svg text { font-family: system-ui, sans-serif; font-size: 11px; fill: var(--muted); }
  .legend span { margin-right: 1.2em; font-size: .85em; }
  .legend i { display: inline-block; width: .9em; height: .9em; border-radius: 50%; vertical-align: -.1em;
              margin-right: .3em; }
  #error { color: var(--bad); font-weight: 600; }
</style>
</head>
<body>
<header>
  <h1>Smart Basket · store operations</h1>
  <span class="meta" id="broker"></span>
  <span class="meta" id="refreshed"></span>
</header>
<main>
  <p id="error"></p>
  <section>
    <h2>Agents <span class="small">(retained status on <code id="topic">PREFIX/agent/+/status</code>)</span></h2>
    <table id="agents">
      <thead><tr><th>agent</th><th>state</th><th>last heard</th><th>guest model</th><th>member model</th>
        <th>last update</th><th class="num">events</th><th class="num">errors</th><th class="num">p99 ms</th>
      </tr></thead>
      <tbody></tbody>
    </table>
  </section>
  <section>
    <h2>Nightly models <span class="small">gate: hit rate @10 on the held-out share of the newest day</span></h2>
    <div class="legend"><span><i style="background:var(--guest)"></i>guest HR@10</span>
      <span><i style="background:var(--member)"></i>member HR@10</span>
      <span><i style="border:2px solid var(--bad);background:#fff"></i>refused (not published)</span></div>
    <svg id="plot" viewBox="0 0 760 230" width="100%" style="max-width:900px" role="img"
         aria-label="HR@10 by night"></svg>
    <table id="models">
      <thead><tr><th>version</th><th>day</th><th>result</th><th class="num">guest HR@10</th>
        <th class="num">member HR@10</th><th class="num">cases</th><th>step timings (s)</th>
        <th class="num">bundle MB</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
</main>
<script>
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text != null) { e.textContent = String(text); }  // textContent only: data is never markup
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text != null) { e.textContent = String(text); }
    return e;
  }
  function cell(row, content, cls) {
    var td = el("td", cls ? { "class": cls } : {});
    (Array.isArray(content) ? content : [content]).forEach(function (c) {
      if (c == null) { return; }
      td.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    });
    row.appendChild(td);
    return td;
  }
  function badge(kind, label) { return el("span", { "class": "badge " + kind }, label || kind); }
  function ago(iso) {
    if (!iso) { return null; }
    var s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 90) { return Math.round(s) + " s ago"; }
    if (s < 5400) { return Math.round(s / 60) + " min ago"; }
    if (s < 172800) { return Math.round(s / 3600) + " h ago"; }
    return Math.round(s / 86400) + " days ago";
  }
  function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
  function num(v, digits) { return v == null || v === "" ? "–" : Number(v).toFixed(digits); }
  function fmtInt(v) { return v == null ? "–" : Number(v).toLocaleString(); }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }

  function renderAgents(agents) {
    var body = document.querySelector("#agents tbody");
    clear(body);
    if (!agents.length) {
      var r = el("tr"); cell(r, el("span", { "class": "empty" }, "no agent has reported yet")).colSpan = 9;
      body.appendChild(r);
      return;
    }
    agents.forEach(function (a) {
      var r = el("tr", { "data-agent": a.agent_id, "data-state": a.state || "" });
      var models = a.models || {}, lu = a.last_update, st = a.stats || {};
      cell(r, el("strong", {}, a.agent_id), "nowrap");
      cell(r, [badge(a.state || "unknown"), el("div", { "class": "small since" },
        a.since ? "since " + when(a.since) : "since before the console started")], "state");
      cell(r, [ago(a.seen_at), el("div", { "class": "small" }, a.status_ts ? "status " + when(a.status_ts) : "")]);
      cell(r, el("code", {}, models.guest || "–"), "model-guest");
      cell(r, el("code", {}, models.member || "–"), "model-member");
      if (lu) {
        cell(r, [badge(lu.result || "unknown"), " ", el("code", {}, lu.version || ""),
                 lu.reason ? el("div", { "class": "reason" }, lu.reason) : null,
                 el("div", { "class": "small" }, when(lu.at))], "last-update");
      } else {
        cell(r, el("span", { "class": "small" }, "none since start"), "last-update");
      }
      cell(r, fmtInt(st.events), "num");
      cell(r, fmtInt(st.errors), "num");
      cell(r, num(st.p99_ms, 2), "num");
      body.appendChild(r);
    });
  }

  var STEPS = ["read_s", "count_s", "guest_refit_s", "member_train_s", "export_s", "gate_s", "pack_s", "publish_s"];
  function result(m) {
    if (m.published) { return "published"; }
    return m.reason ? "refused" : "pending";
  }
  function kept(k) {  // a model the gate refused, replaced by its published version
    return Object.keys(k).map(function (name) {
      return "kept the published " + name + " model (" + k[name].version + "): " + (k[name].reason || "");
    }).join("; ");
  }
  function hr(m, kind) { var v = (m.metrics || {})[kind + "_hr@10"]; return v == null ? null : Number(v); }

  function renderModels(models) {
    var body = document.querySelector("#models tbody"), seenPublished = false;
    clear(body);
    if (!models.length) {
      var r = el("tr"); cell(r, el("span", { "class": "empty" }, "no nightly run yet")).colSpan = 8;
      body.appendChild(r);
    }
    models.forEach(function (m) {
      var res = result(m), mt = m.metrics || {}, t = m.timings || {};
      var r = el("tr", { "data-version": m.version, "data-result": res });
      cell(r, [el("code", {}, m.version), el("div", { "class": "small" }, when(m.created_at))]);
      cell(r, m.through_day || "", "nowrap");
      var current = m.published && !seenPublished;
      seenPublished = seenPublished || m.published;
      cell(r, [badge(res), current ? el("span", { "class": "small" }, " current") : null,
               m.reason ? el("div", { "class": "reason" }, m.reason) : null,
               mt.kept ? el("div", { "class": "small kept" }, kept(mt.kept)) : null], "result");
      var pubG = mt["published_guest_hr@10"], pubM = mt["published_member_hr@10"];
      cell(r, [num(hr(m, "guest"), 4), pubG != null ? el("div", { "class": "small" }, "was " + num(pubG, 4)) : null],
           "num");
      cell(r, [num(hr(m, "member"), 4), pubM != null ? el("div", { "class": "small" }, "was " + num(pubM, 4)) : null],
           "num");
      cell(r, fmtInt(mt.guest_cases) + (mt.member_cases != null ? " / " + fmtInt(mt.member_cases) : ""),
           "num nowrap");
      var keys = STEPS.filter(function (k) { return t[k] != null; }).concat(Object.keys(t).filter(function (k) {
        return k !== "total_s" && STEPS.indexOf(k) < 0;
      }));
      var total = t.total_s != null ? t.total_s : keys.reduce(function (a, k) { return a + Number(t[k] || 0); }, 0);
      cell(r, [keys.length ? el("strong", {}, "total " + num(total, 1)) : "–",
               el("div", { "class": "small" }, keys.map(function (k) {
                 return k.replace(/_s$/, "").replace("_", " ") + " " + num(t[k], 1);
               }).join(" · "))]);
      cell(r, m.bundle_bytes == null ? "–" : num(m.bundle_bytes / 1e6, 2), "num");
      body.appendChild(r);
    });
    plot(models.slice().reverse());
  }

  function plot(rows) {  // oldest first; one point per nightly version
    var s = document.getElementById("plot");
    clear(s);
    var W = 760, H = 230, L = 52, R = 44, T = 14, B = 40;
    var vals = [];
    rows.forEach(function (m) {
      ["guest", "member"].forEach(function (k) { var v = hr(m, k); if (v != null) { vals.push(v); } });
    });
    if (!vals.length) {
      s.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no gate metrics yet"));
      return;
    }
    var top = Math.max(0.05, Math.ceil(Math.max.apply(null, vals) * 10 / 0.9) / 10);
    var n = rows.length;
    var x = function (i) { return n === 1 ? (L + W - R) / 2 : L + i * (W - L - R) / (n - 1); };
    var y = function (v) { return T + (1 - v / top) * (H - T - B); };
    for (var g = 0; g <= 4; g++) {
      var v = top * g / 4;
      s.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e6e9ef" }));
      s.appendChild(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, v.toFixed(2)));
    }
    s.appendChild(svg("text", { x: 12, y: (T + H - B) / 2, transform: "rotate(-90 12 " + (T + H - B) / 2 + ")",
                                "text-anchor": "middle" }, "HR@10"));
    var every = Math.max(1, Math.ceil(n / 10));
    rows.forEach(function (m, i) {
      if (i % every === 0 || i === n - 1) {
        s.appendChild(svg("text", { x: x(i), y: H - B + 16, "text-anchor": "middle" },
                          m.through_day || (m.created_at || "").slice(0, 10)));
      }
    });
    [["guest", "#1f5fbf"], ["member", "#c2570c"]].forEach(function (kc) {
      var kind = kc[0], color = kc[1], pts = [];
      rows.forEach(function (m, i) { var v = hr(m, kind); if (v != null) pts.push([x(i), y(v), m, v]); });
      if (pts.length > 1) {
        s.appendChild(svg("polyline", { points: pts.map(function (p) { return p[0] + "," + p[1]; }).join(" "),
                                        fill: "none", stroke: color, "stroke-width": 2 }));
      }
      pts.forEach(function (p) {
        var refused = !p[2].published && p[2].reason;
        var c = svg("circle", { cx: p[0], cy: p[1], r: refused ? 6 : 4.5, fill: refused ? "#fff" : color,
                                stroke: refused ? "#b3261e" : color, "stroke-width": refused ? 3 : 1,
                                "class": "point " + kind + (refused ? " refused" : "") });
        c.appendChild(svg("title", {}, p[2].version + " · " + kind + " HR@10 " + p[3].toFixed(4) +
                          (refused ? " · refused: " + p[2].reason : "")));
        s.appendChild(c);
      });
    });
  }

  function get(url) {
    return fetch(url, { cache: "no-store" }).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) { throw new Error(url + ": " + (body && body.error || r.status)); }
        return body;
      });
    });
  }
  function refresh() {
    var errors = [];
    Promise.all([
      get("api/agents").then(renderAgents, function (e) { errors.push(e.message); }),
      get("api/models").then(renderModels, function (e) { errors.push(e.message); }),
      get("api/console").then(function (c) {
        document.getElementById("broker").textContent = c.broker_connected ? "MQTT: connected" : "MQTT: not connected";
        if (c.prefix) { document.getElementById("topic").textContent = c.prefix + "/agent/+/status"; }
      }, function (e) { errors.push(e.message); })
    ]).then(function () {
      document.getElementById("error").textContent = errors.join(" · ");
      document.getElementById("refreshed").textContent = "refreshed " + new Date().toLocaleTimeString();
      document.body.setAttribute("data-loaded", "1");
    });
  }
  refresh();
  setInterval(refresh, 5000);
})();
</script>
</body>
</html>
"""
