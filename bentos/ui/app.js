// Persona's profile explorer: plain JS over /rank, /events and /ui/api/*. No build step, no CDN.
// The API key lives only in this page's memory; the address carries the view's state.
"use strict";

const K = 20;
// Chart colours, given to the declared behaviour types (the shop API's event_types) in order and cycled:
// the built-ins keep their colours, and a shop's own types take the next ones.
const PALETTE = ["#c8c8c8", "#9db4d3", "#3d7dd8", "#e377c2", "#f0a030", "#2e9e5b", "#d35454", "#9b59b6",
  "#17becf", "#8c564b", "#bcbd22", "#7f7f7f"];
const state = { key: "", view: "user", userId: "", query: "", device: "", channel: "", timeMode: "shop",
  at: "", newest: null, ranked: [] };

// --- small helpers ------------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function fmtTime(iso) {
  if (!iso) return "—";
  return String(iso).replace("T", " ").replace(/\.\d+/, "").replace(/(Z|[+-]00:00)$/, "");
}

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined) return "—";
  return typeof v === "number" ? (Number.isInteger(v) ? v.toLocaleString() : v.toFixed(digits)) : String(v);
}

function ago(iso, reference) {
  if (!iso) return "";
  const hours = (new Date(reference || Date.now()) - new Date(iso)) / 3.6e6;
  if (new Date(iso).getUTCFullYear() === 1970) return "static row (stamped at the epoch)";
  if (hours < 0) return "after the request time: the online store keeps only the newest state";
  if (Math.abs(hours) < 1) return `${Math.round(hours * 60)} min before the request`;
  if (Math.abs(hours) < 48) return `${hours.toFixed(1)} h before the request`;
  return `${(hours / 24).toFixed(1)} days before the request`;
}

function say(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, body) {
  const headers = { Accept: "application/json" };
  if (state.key) headers["X-API-Key"] = state.key;
  const init = { headers };
  if (body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => null);
  if (response.status === 401) {
    say("This server needs its API key: type it above and press Use.", "error");
    $("api-key").focus();
  }
  if (!response.ok && !(response.status === 422 && path === "/events")) throw new ApiError(response.status, data);
  return data;
}

// --- the address --------------------------------------------------------------------------------------
function readAddress() {
  const p = new URLSearchParams(location.search);
  state.view = p.get("view") === "shop" ? "shop" : "user";
  state.userId = p.get("user_id") || "";
  state.query = p.get("query") || "";
  state.device = p.get("device") || "";
  state.channel = p.get("channel") || "";
  state.at = p.get("at") || "";
  state.timeMode = state.at ? "custom" : p.get("time") || "shop";
}

function writeAddress(push = false) {
  const p = new URLSearchParams();
  if (state.view === "shop") p.set("view", "shop");
  if (state.view === "user" && state.userId) p.set("user_id", state.userId);
  if (state.view === "user" && state.query) p.set("query", state.query);
  if (state.device) p.set("device", state.device);
  if (state.channel) p.set("channel", state.channel);
  if (state.timeMode === "custom" && state.at) p.set("at", state.at);
  if (state.timeMode === "now") p.set("time", "now");
  const url = `${location.pathname}${p.toString() ? "?" + p : ""}`;
  if (url !== location.pathname + location.search) history[push ? "pushState" : "replaceState"](null, "", url);
}

// --- the request context ------------------------------------------------------------------------------
function requestTime() {
  if (state.timeMode === "now") return new Date().toISOString();
  if (state.timeMode === "custom" && state.at) return new Date(state.at.endsWith("Z") ? state.at : state.at + "Z").toISOString();
  // The shop's clock: a minute after its newest event, so a sample shop's profiles are not empty today.
  const newest = state.newest ? new Date(state.newest) : new Date();
  return new Date(newest.getTime() + 60_000).toISOString();
}

function context(at) {
  const ctx = { timestamp: at };
  if (state.device) ctx.device = state.device;
  if (state.channel) ctx.channel = state.channel;
  return ctx;
}

function fillSelect(select, values, chosen) {
  for (const v of values) if (![...select.options].some((o) => o.value === v)) select.append(el("option", { value: v }, v));
  select.value = chosen;
}

// --- user view ----------------------------------------------------------------------------------------
async function loadUserLists() {
  const data = await api("/ui/api/users");
  state.newest = data.newest_event;
  const chip = (u) => el("button", { type: "button", class: "chip", dataset: { user: u.user_id },
    title: `${u.events} events; last ${fmtTime(u.last_event)}`, onclick: () => pickUser(u.user_id) },
  u.user_id, el("small", {}, ` ${u.events}`));
  $("active-users").replaceChildren(...data.active.map(chip));
  $("cold-users").replaceChildren(...data.cold.map(chip));
  fillSelect($("device"), data.devices, state.device);
  fillSelect($("channel"), data.channels, state.channel);
}

function pickUser(userId) {
  state.userId = userId;
  state.query = "";
  $("user-id").value = userId;
  $("query").value = "";
  writeAddress(true);
  loadUser();
}

async function loadUser() {
  if (!state.userId) return;
  const at = requestTime();
  $("request-time").textContent = `request time ${fmtTime(at)} UTC`;
  say(`Loading ${state.userId}…`);
  const params = new URLSearchParams({ at });
  if (state.device) params.set("device", state.device);
  if (state.channel) params.set("channel", state.channel);
  const [profile, ranking] = await Promise.all([
    api(`/ui/api/users/${encodeURIComponent(state.userId)}?${params}`), rank(at)]);
  $("user-body").hidden = false;
  showProfile(profile);
  showRanking(ranking);
  say(`${state.userId}: ${profile.known ? "known user" : "unknown to the online store (cold start)"}.`);
}

function rank(at, query = state.query) {
  return api("/rank", { user_id: state.userId, query: query || null, context: context(at), k: K });
}

function showProfile(p) {
  $("profile-user").textContent = p.user_id;
  $("cold-badge").hidden = p.known;
  $("tags").replaceChildren(...p.tags.map((t) => el("div", { class: "tag", dataset: { tag: t.name } },
    el("span", { class: "tag-name" }, t.name),
    el("span", { class: "tag-values" }, t.values.length ? t.values.map((v) => el("b", {}, v)) : el("i", {}, "none yet")),
    el("span", { class: "tag-from", title: "the features this tag is read from" }, "from " + t.features.join(", ")))));
  showFamilies(p.families, p.at);
  showTimeline(p.timeline);
}

function showFamilies(families, at) {
  const blocks = Object.entries(families).map(([family, views]) => el("div", { class: "family", dataset: { family } },
    el("h3", {}, family),
    views.length ? views.map((v) => viewBlock(v, family, at)) : el("p", { class: "muted" }, "no view")));
  $("families").replaceChildren(...blocks);
}

function viewBlock(v, family, at) {
  const fresh = v.on_demand ? "computed at the request"
    : v.written_at ? `written ${fmtTime(v.written_at)} UTC · ${ago(v.written_at, at)}` : "no row for this user";
  const rows = Object.entries(v.features).map(([name, value]) =>
    el("tr", {}, el("th", {}, name), el("td", {}, value === null ? "—" : fmtNum(value))));
  const open = family !== "behaviour" || v.view === "user_behaviour_now";
  return el("details", { class: "view", open },
    el("summary", {}, el("b", {}, v.view), " ", el("span", { class: "fresh" }, fresh)),
    el("table", { class: "kv" }, rows));
}

function showTimeline(events) {
  const rows = events.map((e) => el("tr", { dataset: { type: e.type } },
    el("td", {}, fmtTime(e.time)), el("td", {}, el("span", { class: `etype ${e.type}` }, e.type)),
    el("td", {}, e.title ? `${e.title} ` : "", e.item_id ? el("small", {}, e.item_id) : ""),
    el("td", {}, e.query || ""), el("td", {}, [e.device, e.channel].filter(Boolean).join(" / "))));
  $("timeline").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5 }, "no events"))]));
}

function showRanking(r) {
  state.ranked = r.items;
  const source = r.query_source === "session" ? ` (from the session's recent search “${r.query}”)` : "";
  $("rank-note").textContent = r.query ? `Personalised search for “${r.query}”${source}. Model ${r.model}.`
    : `Recommendations, no query. Model ${r.model}.${r.cold_start ? " Cold start: no profile yet." : ""}`;
  const rows = r.items.map((item, n) => el("tr", { dataset: { item: item.item_id } },
    el("td", {}, n + 1),
    el("td", {}, item.title || "(untitled)", " ", el("small", {}, item.item_id)),
    el("td", { class: "num" }, item.score.toFixed(4)),
    el("td", {}, el("ul", { class: "reasons" }, item.reasons.map((x) => el("li", {}, x)))),
    el("td", { class: "actions" },
      el("button", { type: "button", class: "whatif-click", onclick: () => whatIf({ event_type: "click", item_id: item.item_id }, `a click on ${item.title || item.item_id}`) }, "click"),
      el("button", { type: "button", class: "whatif-purchase", onclick: () => whatIf({ event_type: "purchase", item_id: item.item_id }, `a purchase of ${item.title || item.item_id}`) }, "buy"))));
  $("ranking").tBodies[0].replaceChildren(...rows);
}

// --- what-if: one event, the ranking before and after --------------------------------------------------
async function whatIf(event, label) {
  const at = requestTime();
  const when = new Date(new Date(at).getTime() - 1000).toISOString();
  say(`What if: ${label}…`);
  try {
    const before = await rank(at);
    const posted = await api("/events", { events: [{ event_id: `ui-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`,
      user_id: state.userId, event_timestamp: when, device: state.device || null, channel: state.channel || null,
      ...event }] });
    if (posted.rejected && posted.rejected.length) {
      const reasons = posted.rejected.flatMap((r) => (r.reasons || []).map((x) => x.reason || x)).join("; ");
      say(`The event was rejected: ${reasons}`, "error");
      return;
    }
    const after = await rank(at);
    showWhatIf(label, before.items, after.items, posted.online_update);
    showRanking(after);
    const params = new URLSearchParams({ at });
    if (state.device) params.set("device", state.device);
    if (state.channel) params.set("channel", state.channel);
    showProfile(await api(`/ui/api/users/${encodeURIComponent(state.userId)}?${params}`));
    say(`What if: ${label}. Posted; online update ${posted.online_update}.`);
  } catch (error) {
    say(`What-if failed: ${error.message}`, "error");
  }
}

function moveOf(id, beforePos, afterPos) {
  if (!(id in beforePos)) return { move: "new", mark: "★ new" };
  if (!(id in afterPos)) return { move: "gone", mark: "✕ gone" };
  const d = beforePos[id] - afterPos[id];
  return d > 0 ? { move: "up", mark: `▲ ${d}` } : d < 0 ? { move: "down", mark: `▼ ${-d}` } : { move: "same", mark: "=" };
}

function showWhatIf(label, before, after, online) {
  const pos = (items) => Object.fromEntries(items.map((x, n) => [x.item_id, n]));
  const b = pos(before), a = pos(after);
  const entry = (item, list) => {
    const m = list === "after" ? moveOf(item.item_id, b, a) : (item.item_id in a ? { move: "kept", mark: "" } : moveOf(item.item_id, b, a));
    return el("li", { class: `moved ${m.move}`, dataset: { item: item.item_id, move: m.move } },
      el("span", { class: "mark" }, m.mark), " ", item.title || item.item_id, " ", el("small", {}, item.score.toFixed(3)));
  };
  $("whatif-title").textContent = `What if: ${label} (online update: ${online})`;
  $("before").replaceChildren(...before.map((x) => entry(x, "before")));
  $("after").replaceChildren(...after.map((x) => entry(x, "after")));
  $("whatif-result").hidden = false;
  $("whatif-result").scrollIntoView({ block: "nearest" });
}

// --- shop view ----------------------------------------------------------------------------------------
async function loadShop() {
  say("Loading the shop…");
  const s = await api("/ui/api/shop");
  const card = (label, value, note) => el("div", { class: "card" }, el("b", {}, fmtNum(value)), el("span", {}, label), note ? el("small", {}, note) : null);
  $("shop-counts").replaceChildren(
    card("items in the catalogue", s.counts.items), card("users", s.counts.users),
    card("active users, 7 days", s.active_users["7d"], `${s.active_users["1d"]} in 1 day, ${s.active_users["30d"]} in 30`),
    card("events", s.counts.events, `${fmtTime(s.oldest_event)} to ${fmtTime(s.newest_event)}`),
    card("rows in quarantine", s.counts.quarantined), card("store profile", s.profile));
  $("chart").replaceChildren(chart(s.events_per_day, (s.event_types || []).map((t) => t.type)));
  showBatches(s.batches);
  showReports(s.reports);
  showModels(s.models);
  showFreshness(s.freshness);
  say(`Shop as of its newest event, ${fmtTime(s.newest_event)} UTC.`);
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function chart(days, declared) {
  if (!days.length) return el("p", { class: "muted" }, "no events yet");
  // The declared types in order, then any other the log holds (a type persona.yaml no longer declares).
  const types = [...declared];
  for (const d of days) for (const type of Object.keys(d.by_type)) if (!types.includes(type)) types.push(type);
  const colour = (type) => PALETTE[types.indexOf(type) % PALETTE.length];
  const W = 900, H = 220, left = 48, bottom = 28, top = 10;
  const legend = [];  // [type, x, row]
  let x = left, row = 0;
  for (const type of types) {
    const width = 24 + type.length * 7;
    if (x + width > W && x > left) { x = left; row += 1; }
    legend.push([type, x, row]);
    x += width;
  }
  const max = Math.max(...days.map((d) => d.total));
  const bw = (W - left - 10) / days.length;
  const y = (v) => H - bottom - (v / max) * (H - bottom - top);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H + 24 + row * 16}`, role: "img", "aria-label": "events per day" });
  for (const frac of [0, 0.5, 1]) {
    root.append(svg("line", { x1: left, x2: W - 10, y1: y(max * frac), y2: y(max * frac), class: "grid" }),
      svg("text", { x: left - 6, y: y(max * frac) + 4, "text-anchor": "end" }, fmtNum(Math.round(max * frac))));
  }
  days.forEach((d, n) => {
    let base = 0;
    for (const type of types) {
      const v = d.by_type[type] || 0;
      if (!v) continue;
      root.append(svg("rect", { x: left + n * bw + 1, width: Math.max(bw - 2, 1), y: y(base + v), height: y(base) - y(base + v),
        fill: colour(type), "data-day": d.day, "data-type": type }, svg("title", {}, `${d.day}: ${v} ${type} (${d.total} events)`)));
      base += v;
    }
  });
  const first = days[0].day, last = days[days.length - 1].day;
  root.append(svg("text", { x: left, y: H - 8 }, first), svg("text", { x: W - 10, y: H - 8, "text-anchor": "end" }, last));
  for (const [type, lx, r] of legend) {
    root.append(svg("rect", { x: lx, y: H + 8 + r * 16, width: 10, height: 10, fill: colour(type), "data-legend": type }),
      svg("text", { x: lx + 14, y: H + 17 + r * 16 }, type));
  }
  return root;
}

function showBatches(batches) {
  const rows = batches.map((b) => el("tr", { dataset: { batch: b.batch_id, status: b.status, quarantined: b.quarantined } },
    el("td", {}, fmtTime(b.created_at)), el("td", {}, b.source), el("td", {}, el("span", { class: `st ${b.status}` }, b.status)),
    el("td", { class: "num" }, fmtNum(b.rows)), el("td", { class: "num" }, fmtNum(b.accepted)),
    el("td", { class: `num ${b.quarantined ? "warn" : ""}` }, fmtNum(b.quarantined)),
    el("td", {}, el("a", { href: "#", class: "batch-link", onclick: (e) => { e.preventDefault(); showBatch(b.batch_id); } }, "summary"))));
  $("batches").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 7 }, "no batches yet"))]));
}

async function showBatch(id) {
  const d = await api(`/ui/api/batches/${encodeURIComponent(id)}`);
  const tables = Object.entries(d.summary.tables || {}).map(([name, t]) => el("tr", {}, el("th", {}, name),
    el("td", {}, `${t.rows} rows, ${t.accepted} accepted, ${t.quarantined} quarantined, ${t.duplicates || 0} duplicates`),
    el("td", {}, Object.entries(t.rules || {}).map(([r, n]) => `${r}: ${n}`).join(", "))));
  const rows = d.quarantined.map((q) => el("tr", {}, el("td", {}, q.table_name), el("td", {}, q.row_number ?? ""),
    el("td", {}, q.record_key ?? ""), el("td", {}, q.rule), el("td", {}, q.column_name ?? ""), el("td", {}, q.reason), el("td", {}, q.status)));
  $("batch-detail").replaceChildren(el("h3", {}, `Batch ${id} from ${d.summary.source || ""}`),
    el("p", {}, d.summary.held ? `Held: ${(d.summary.hold_reasons || []).join("; ")}` : "Not held."),
    el("table", {}, tables), rows.length ? el("table", {}, el("thead", {}, el("tr", {}, ["table", "row", "key", "rule", "column", "reason", "status"].map((h) => el("th", {}, h)))), el("tbody", {}, rows))
      : el("p", { class: "muted" }, "No quarantined rows."),
    el("button", { type: "button", onclick: () => { $("batch-detail").hidden = true; } }, "close"));
  $("batch-detail").hidden = false;
}

function showReports(reports) {
  const open = async (path) => {
    const headers = state.key ? { "X-API-Key": state.key } : {};
    const response = await fetch(`/ui/api/reports/${path}`, { headers });
    if (!response.ok) return say(`Could not open ${path}: HTTP ${response.status}`, "error");
    window.open(URL.createObjectURL(await response.blob()), "_blank");
  };
  const items = reports.map((r) => el("li", {}, r.name, " ",
    el("a", { href: "#", onclick: (e) => { e.preventDefault(); open(r.html); } }, "HTML"), " · ",
    el("a", { href: "#", onclick: (e) => { e.preventDefault(); open(r.md); } }, "Markdown")));
  $("reports").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "none yet: `persona validate` writes them")]));
}

function showModels(models) {
  const rows = models.flatMap((m, n) => (m.metrics.length ? m.metrics : [{}]).map((r, i) => el("tr", { class: n === 0 ? "current" : "" },
    el("td", {}, i ? "" : m.tag, n === 0 && !i ? el("small", {}, " latest") : ""), el("td", {}, i ? "" : fmtTime(m.created)),
    el("td", {}, i || !m.data_window ? "" : `${fmtTime(m.data_window.from)} to ${fmtTime(m.data_window.to)}, ${fmtNum(m.data_window.events)} events`),
    el("td", {}, [r.split, r.model].filter(Boolean).join(" · ") || "no metrics"),
    ...["NDCG@10", "Recall@10", "MRR@10", "AUC"].map((k) => el("td", { class: "num" }, fmtNum(r[k]))))));
  $("models").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8 }, "no model yet: `persona train`"))]));
}

function showFreshness(views) {
  $("freshness").tBodies[0].replaceChildren(...views.map((v) => el("tr", {},
    el("td", {}, v.view), el("td", {}, v.family || ""),
    el("td", {}, v.on_demand ? "computed at each request" : fmtTime(v.materialized_to)),
    el("td", { class: "num" }, fmtNum(v.rows_in_build)), el("td", {}, fmtTime(v.built_at)), el("td", {}, fmtTime(v.synced_at)))));
}

// --- wiring -------------------------------------------------------------------------------------------
function showView() {
  $("user-view").hidden = state.view !== "user";
  $("shop-view").hidden = state.view !== "shop";
  for (const tab of document.querySelectorAll("nav a")) tab.classList.toggle("active", tab.dataset.view === state.view);
}

async function refresh() {
  showView();
  try {
    if (state.view === "shop") await loadShop();
    else {
      await loadUserLists();
      if (state.userId) await loadUser();
      else say("Pick a user: type an id, or choose one of the most active or coldest users.");
    }
  } catch (error) {
    if (error.status !== 401) say(`Could not load: ${error.message}`, "error");
  }
}

function contextChanged() {
  state.timeMode = $("time-mode").value;
  $("time-at").hidden = state.timeMode !== "custom";
  state.at = state.timeMode === "custom" ? $("time-at").value : "";
  state.device = $("device").value;
  state.channel = $("channel").value;
  writeAddress();
  if (state.userId) loadUser().catch((e) => say(`Could not load: ${e.message}`, "error"));
}

function wire() {
  $("key-form").addEventListener("submit", (e) => { e.preventDefault(); state.key = $("api-key").value; refresh(); });
  $("user-form").addEventListener("submit", (e) => { e.preventDefault(); pickUser($("user-id").value.trim()); });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.query = $("query").value.trim();
    writeAddress(true);
    loadUser().catch((err) => say(`Could not rank: ${err.message}`, "error"));
  });
  $("whatif-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("whatif-query").value.trim();
    if (q) whatIf({ event_type: "search", query: q }, `a search for “${q}”`);
  });
  for (const id of ["time-mode", "time-at", "device", "channel"]) $(id).addEventListener("change", contextChanged);
  for (const tab of document.querySelectorAll("nav a")) {
    tab.addEventListener("click", (e) => { e.preventDefault(); state.view = tab.dataset.view; writeAddress(true); refresh(); });
  }
  window.addEventListener("popstate", () => { readAddress(); syncInputs(); refresh(); });
}

function syncInputs() {
  $("user-id").value = state.userId;
  $("query").value = state.query;
  $("time-mode").value = state.timeMode;
  $("time-at").hidden = state.timeMode !== "custom";
  $("time-at").value = state.at.replace("Z", "");
}

readAddress();
syncInputs();
wire();
refresh();
