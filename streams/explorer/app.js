// streamrec explorer: one user's events, recommendations (pull) and live pushes (server-sent events).
"use strict";
(() => {
  const K = 10;
  const $ = (sel) => document.querySelector(sel);
  const texts = {};
  let user = null;
  let stream = null;
  let pushes = 0;
  let shown = [];
  let eventsTimer = null;

  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  };
  const time = (ms) => (ms ? new Date(ms).toLocaleTimeString() : "");
  const itemLabel = (id) => texts[id] || id;
  const getJSON = async (url) => {
    const r = await fetch(url, { cache: "no-store" });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  };

  function renderRecs(msg, source) {
    const table = $("#recs");
    const body = table.querySelector("tbody");
    const before = new Set(shown);
    body.replaceChildren();
    msg.items.slice(0, K).forEach((x, n) => {
      const tr = el("tr");
      tr.dataset.itemId = x.item_id;
      if (source === "push" && before.size && !before.has(x.item_id)) tr.className = "new";
      tr.append(el("td", n + 1, "num"));
      const td = el("td");
      td.append(el("div", itemLabel(x.item_id)), el("div", x.item_id, "id"));
      const why = el("td");
      why.append(el("div", x.reason, "reason"));
      const like = x.reason.startsWith("similar_to:") ? texts[x.reason.slice(11)] : null;
      if (like) why.append(el("div", `like ${like}`, "muted small"));
      tr.append(td, el("td", x.score.toFixed(4), "num"), why);
      body.append(tr);
    });
    shown = msg.items.slice(0, K).map((x) => x.item_id);
    table.dataset.source = source;
    table.dataset.sourceEventId = msg.source_event_id || "";
    table.dataset.generatedAt = String(msg.generated_at);
    const badge = $("#recs-source");
    badge.className = "badge " + (source === "push" ? "push" : "muted");
    badge.textContent =
      source === "push"
        ? `live push ${time(msg.generated_at)} · event→result ${msg.event_to_result_ms} ms`
        : `pulled ${time(msg.generated_at)} · model ${msg.model_version}`;
  }

  function renderEvents(events) {
    const body = $("#events tbody");
    body.replaceChildren();
    if (!events.length) {
      const tr = el("tr");
      const td = el("td", "no events seen by this worker yet", "muted");
      td.colSpan = 3;
      tr.append(td);
      body.append(tr);
    }
    for (const e of events) {
      const tr = el("tr");
      tr.dataset.eventId = e.event_id;
      const what = el("td");
      if (e.type === "search") what.append(el("div", `“${e.query}”`));
      else what.append(el("div", e.item_text || e.item_id), el("div", `${e.item_id} · ${e.category || ""}`, "id"));
      tr.append(el("td", time(e.ts), "num"), el("td", e.type), what);
      body.append(tr);
    }
  }

  async function loadUser(withRecs) {
    if (!user) return;
    const who = user;
    const v = await getJSON(`/explorer/api/user/${encodeURIComponent(who)}?k=${K}`);
    if (who !== user) return;
    Object.assign(texts, v.item_texts);
    renderEvents(v.events);
    if (withRecs && v.recommendations) renderRecs(v.recommendations, "pull");
  }

  function onPush(ev) {
    const data = JSON.parse(ev.data);
    Object.assign(texts, data.item_texts);
    const msg = data.message;
    renderRecs(msg, "push");
    pushes += 1;
    $("#push-count").textContent = String(pushes);
    const li = el("li");
    li.dataset.sourceEventId = msg.source_event_id || "";
    const top = msg.items.slice(0, 3).map((x) => `${itemLabel(x.item_id)} (${x.reason})`).join(", ");
    li.append(el("b", time(msg.generated_at)), el("span", ` · event→result ${msg.event_to_result_ms} ms`, "muted"));
    li.append(el("div", top, "small"));
    $("#pushes").prepend(li);
    clearTimeout(eventsTimer);
    eventsTimer = setTimeout(() => loadUser(false).catch(() => {}), 200);
  }

  function select(id) {
    id = id.trim();
    if (!id) return;
    user = id;
    pushes = 0;
    shown = [];
    $("#push-count").textContent = "0";
    $("#pushes").replaceChildren();
    $("#user-input").value = id;
    $("#user-title").textContent = `User ${id}`;
    history.replaceState(null, "", `#user=${encodeURIComponent(id)}`);
    document.querySelectorAll("#users li").forEach((li) => li.classList.toggle("selected", li.dataset.user === id));
    if (stream) stream.close();
    stream = new EventSource(`/explorer/stream?user=${encodeURIComponent(id)}`);
    stream.addEventListener("hello", () => ($("#conn").textContent = `live: watching pushes for ${id}`));
    stream.addEventListener("push", onPush);
    stream.onerror = () => ($("#conn").textContent = "live stream reconnecting…");
    loadUser(true).catch((e) => ($("#conn").textContent = `error: ${e.message}`));
  }

  async function loadUsers() {
    const v = await getJSON("/explorer/api/users?limit=25");
    const ul = $("#users");
    ul.replaceChildren();
    for (const u of v.users) {
      const li = el("li");
      li.dataset.user = u.user_id;
      if (u.user_id === user) li.className = "selected";
      li.append(el("span", u.user_id), el("span", `${u.last_type} ${time(u.last_ts)}`, "muted small"));
      li.addEventListener("click", () => select(u.user_id));
      ul.append(li);
    }
    $("#users-note").textContent =
      `${v.tracked_users} users tracked by this worker (max ${v.max_users}, last ${v.events_per_user} events each).`;
  }

  async function loadAlerts() {
    const v = await getJSON("/explorer/api/alerts?limit=20");
    const ul = $("#alerts");
    ul.replaceChildren();
    if (!v.alerts.length) ul.append(el("li", "none", "muted"));
    for (const a of v.alerts) {
      const li = el("li");
      li.append(el("b", a.kind === "surge" ? "▲ surge" : "▼ drop", a.kind), document.createTextNode(` ${a.level} `));
      li.append(el("span", a.text ? `${a.text} (${a.key})` : a.key));
      ul.append(li);
    }
    if (v.total > v.alerts.length) ul.append(el("li", `… ${v.total - v.alerts.length} more`, "muted"));
  }

  const every = (fn, ms) => {
    const run = () => fn().catch(() => {});
    run();
    setInterval(run, ms);
  };

  $("#pick").addEventListener("submit", (e) => {
    e.preventDefault();
    select($("#user-input").value);
  });
  every(loadUsers, 3000);
  every(loadAlerts, 5000);
  const m = location.hash.match(/user=([^&]+)/);
  if (m) select(decodeURIComponent(m[1]));
})();
