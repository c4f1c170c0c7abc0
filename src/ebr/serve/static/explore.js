// The explorer: one user's history, clusters and candidates, over the service's JSON API only
// (/v1/users, /v1/retrieve with explain, /v1/pins); no second scoring path, no external assets.
"use strict";
const $ = (id) => document.getElementById(id);
let modes = ["single"];

function showError(msg) {
  const e = $("error");
  e.textContent = msg;
  e.hidden = !msg;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (err) { data = null; }
  if (!r.ok) {
    const d = data && data.detail;
    const text = Array.isArray(d) ? d.map((x) => (x.field ? x.field + ": " : "") + x.problem).join("; ") : (d || r.statusText);
    throw new Error(`${path.split("?")[0]} answered ${r.status}: ${text}`);
  }
  return data;
}

function tile(p, extra) {
  const t = document.createElement("div");
  t.className = "tile" + (extra && extra.invalid ? " invalid" : "");
  t.style.backgroundColor = p.colour || "#888";
  t.dataset.pin = p.pin_id;
  const lines = [`<div class="pid"></div>`];
  if (extra && extra.action) lines.push(`<div class="act"></div>`);
  lines.push(`<div class="ints"></div>`);
  if (extra && extra.source) lines.push(`<span class="src"></span>`);
  t.innerHTML = lines.join("");
  t.querySelector(".pid").textContent = p.pin_id;
  if (extra && extra.action) t.querySelector(".act").textContent = extra.action;
  t.querySelector(".ints").textContent = (p.interests || []).join(" ");
  if (extra && extra.source) { t.querySelector(".src").textContent = extra.source; t.dataset.source = extra.source; }
  t.title = `${p.pin_id}\n${(p.interests || []).join(", ")}`;
  return t;
}

function fill(el, nodes) {
  el.replaceChildren(...nodes);
}

async function loadUser(userId) {
  showError("");
  delete document.body.dataset.loaded;
  if (!userId) return;
  const url = new URL(window.location);
  url.searchParams.set("user", userId);
  window.history.replaceState(null, "", url);
  $("user-search").value = userId;
  const mode = $("mode").value || "single";
  const k = Math.max(1, Math.min(500, parseInt($("k").value, 10) || 40));
  let view, res;
  try {
    view = await api(`/v1/users/${encodeURIComponent(userId)}`);
    const body = {user_id: userId, k: k, mode: mode, explain: mode !== "single"};
    if (mode === "conditional") {
      // the conditions: as typed, else the user's followed interests, else its history's most frequent
      if (!$("interests").value.trim()) $("interests").value = defaultInterests(view).join(",");
      body.interests = $("interests").value.split(",").map((x) => x.trim()).filter((x) => x);
    }
    res = await api("/v1/retrieve", body);
  } catch (err) {
    for (const s of ["summary", "history-section", "clusters-section", "columns-section", "merged-section"]) $(s).hidden = true;
    showError(err.message);
    document.body.dataset.loaded = "error";
    return;
  }
  const info = (await api("/v1/pins", {pin_ids: res.items.map((x) => x.pin_id)})).pins;
  $("summary").hidden = false;
  $("user-title").textContent = `user ${userId}`;
  $("user-status").textContent = !view.known
    ? "Unknown user: the cold-start path serves popular pins."
    : res.cold_start ? "No history: served by the cold-start path." : `${view.history.length} history items as of the bundle.`;
  $("user-status").dataset.known = String(view.known);
  $("followed").textContent = view.followed.length ? `follows: ${view.followed.join(", ")}` : "";
  $("truth").hidden = !view.truth;
  if (view.truth) fill($("truth-list"), view.truth.map((t) => { const li = document.createElement("li"); li.textContent = `${t.interest} (${t.weight})`; return li; }));
  $("history-section").hidden = !view.known;
  fill($("history"), view.history.map((h) => tile(h, {action: h.action, invalid: !h.valid})));
  const items = res.items.map((x) => ({...x, ...(info[x.pin_id] || {})}));
  $("merged-section").hidden = false;
  $("merged-note").textContent = `(mode ${res.mode}, ${items.length} pins, each tagged with the embedding or interest that produced it)`;
  fill($("merged"), items.map((x) => tile(x, {source: x.source})));
  const embs = (res.embeddings || []).filter((e) => e.history !== undefined && e.history !== null);
  const lists = (res.embeddings || []).filter((e) => e.kind !== undefined && e.kind !== null);
  $("columns-section").hidden = lists.length === 0;
  fill($("columns"), lists.map((e) => {
    const col = document.createElement("div");
    col.className = "column";
    col.dataset.source = e.source;
    col.innerHTML = "<h4></h4><p><small></small></p>";
    col.querySelector("h4").textContent = e.source;
    col.querySelector("small").textContent = e.kind === "implicit" ? "implicit (no condition)" : `${e.kind} interest`;
    const cands = document.createElement("div");
    cands.className = "tiles column-candidates";
    fill(cands, items.filter((x) => x.source === e.source).map((x) => tile(x, {source: x.source})));
    col.appendChild(cands);
    return col;
  }));
  $("clusters-section").hidden = embs.length === 0;
  const byPin = new Map(view.history.map((h) => [h.pin_id, h]));
  fill($("clusters"), embs.map((e) => {
    const row = document.createElement("div");
    row.className = "cluster";
    row.dataset.source = e.source;
    const head = document.createElement("div");
    head.innerHTML = "<h4></h4><p></p>";
    head.querySelector("h4").textContent = e.source;
    head.querySelector("p").textContent = `importance ${e.importance.toFixed(2)}, ${e.history.length} history items`;
    const hist = document.createElement("div");
    hist.className = "tiles cluster-history";
    fill(hist, e.history.map((p) => tile(byPin.get(p) || {pin_id: p}, {})));
    const cands = document.createElement("div");
    cands.className = "tiles cluster-candidates";
    fill(cands, items.filter((x) => x.source === e.source).map((x) => tile(x, {source: x.source})));
    row.replaceChildren(head, hist, cands);
    return row;
  }));
  document.body.dataset.loaded = res.mode;
}

function defaultInterests(view) {
  if (view.followed.length) return view.followed.slice(0, 3);
  const counts = new Map();
  for (const h of view.history) if (h.valid) for (const i of h.interests) counts.set(i, (counts.get(i) || 0) + 1);
  return [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 3).map((x) => x[0]);
}

async function searchUsers() {
  const q = $("user-search").value.trim();
  try {
    const data = await api(`/v1/users?q=${encodeURIComponent(q)}&limit=30`);
    fill($("user-list"), data.users.map((u) => {
      const li = document.createElement("li");
      li.textContent = u;
      li.dataset.user = u;
      li.addEventListener("click", () => loadUser(u));
      return li;
    }));
  } catch (err) {
    showError(err.message);
  }
}

async function init() {
  try {
    const ready = await api("/readyz");
    modes = ready.modes;
    $("bundle").textContent = `bundle ${ready.version} (${ready.backend})`;
  } catch (err) {
    showError(err.message);
  }
  fill($("mode"), [...modes, "auto"].map((m) => { const o = document.createElement("option"); o.value = m; o.textContent = m; return o; }));
  let timer = null;
  $("user-search").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(searchUsers, 200); });
  $("user-search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") loadUser($("user-search").value.trim()); });
  $("open-user").addEventListener("click", () => loadUser($("user-search").value.trim()));
  $("mode").addEventListener("change", () => {
    $("interests-label").hidden = $("mode").value !== "conditional";
    loadUser($("user-search").value.trim());
  });
  $("interests").addEventListener("keydown", (ev) => { if (ev.key === "Enter") loadUser($("user-search").value.trim()); });
  const user = new URL(window.location).searchParams.get("user");
  if (user) await loadUser(user);
  else await searchUsers();
  document.body.dataset.ready = "1";
}

init();
