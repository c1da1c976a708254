// park ui: the page. Jobs arrive over one server-sent event stream (a snapshot, then changes);
// a job's detail, graph and reported values are fetched when it is selected. Every text from a
// broker is put in the page as text (textContent), never as HTML. Plots and graphs are plain SVG.
"use strict";

const PAGE = 100;                       // rows per page: 10,000 jobs are paged, not all drawn
const PALETTE = ["#1565c0", "#e65100", "#2e7d32", "#6a1b9a", "#00838f", "#ad1457", "#5d4037"];
const SVG = "http://www.w3.org/2000/svg";
const jobs = new Map();                 // "site/id" -> row
let colours = {};
let page = 0;
let selected = null;                    // {site, id}
let series = null;                      // the plot's data: {lines, thresholds, until}
let graph = null;                       // the condition graph drawn: {root, nodes, edges}
let drawPending = false;

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "bg") node.style.background = v;      // through the CSSOM: the CSP forbids style attributes
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
const $ = (id) => document.getElementById(id);
const key = (site, id) => `${site}/${id}`;
const when = (t) => t ? new Date(t * 1000).toLocaleTimeString() : "";
const values = (v) => Object.entries(v || {}).map(([k, x]) => `${k}=${Number(x).toPrecision(4)}`).join(" ");

// A memo hit is a submission an earlier job answered: its row follows that job, and says which it is.
function memoCell(row) {
  if (row.reuses) return el("td", {class: "memo hit", title: `answered by ${row.site}/${row.reuses}`,
                                   text: `hit: ${row.reuses.slice(0, 10)}`});
  return el("td", {class: "memo", text: row.reused ? `reused ×${row.reused}` : ""});
}

function stateCell(state) {
  return el("td", {class: "state", text: state, bg: colours[state] || "#fff"});
}

// -- the job list ------------------------------------------------------------------------

function filtered() {
  const site = $("site-filter").value, state = $("state-filter").value;
  const text = $("text-filter").value.trim().toLowerCase();
  const out = [];
  for (const row of jobs.values()) {
    if (site && row.site !== site) continue;
    if (state && row.state !== state) continue;
    if (text && !`${row.label} ${row.id} ${row.owner} ${row.detail} ${row.reuses}`.toLowerCase().includes(text)) continue;
    out.push(row);
  }
  return out.sort((a, b) => b.submitted - a.submitted || (a.id < b.id ? -1 : 1));
}

function drawList() {
  drawPending = false;
  const rows = filtered();
  const pages = Math.max(1, Math.ceil(rows.length / PAGE));
  page = Math.min(page, pages - 1);
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...rows.slice(page * PAGE, (page + 1) * PAGE).map((row) => {
    const tr = el("tr", {"data-key": key(row.site, row.id), "data-state": row.state},
      el("td", {text: row.site}), el("td", {class: "mono", text: row.id.slice(0, 10)}), el("td", {text: row.owner}),
      el("td", {text: row.label}), stateCell(row.state), el("td", {text: row.attempt || ""}), memoCell(row),
      el("td", {class: "mono", text: values(row.values)}), el("td", {class: "detail", text: row.detail}));
    if (selected && key(selected.site, selected.id) === key(row.site, row.id)) tr.classList.add("selected");
    return tr;
  }));
  $("count").textContent = `${rows.length} of ${jobs.size} jobs`;
  // The memo column takes room from the details: shown once some job listed is or was a memo hit.
  $("jobs").classList.toggle("no-memo", !rows.some((row) => row.reuses || row.reused));
  drawQueues();
  $("page").textContent = `page ${page + 1} of ${pages}`;
  $("prev").disabled = page === 0;
  $("next").disabled = page >= pages - 1;
}

// An admin's token shows every user's jobs at a site: then say how much each user has waiting and running.
function drawQueues() {
  const counts = new Map();
  for (const row of jobs.values()) {
    if (!["waiting", "queued", "running"].includes(row.state)) continue;
    const k = `${row.site} · ${row.owner}`;
    const c = counts.get(k) || {waiting: 0, queued: 0, running: 0};
    c[row.state]++;
    counts.set(k, c);
  }
  const owners = new Set([...jobs.values()].map((r) => r.owner));
  $("queues").replaceChildren(...(owners.size < 2 ? [] : [...counts].sort().map(([k, c]) =>
    el("span", {class: "queue", "data-queue": k, text: `${k}: ${c.queued} queued, ${c.running} running, ${c.waiting} waiting`}))));
}

function redraw() {
  if (!drawPending) { drawPending = true; requestAnimationFrame(drawList); }
}

function drawSites(sites) {
  $("sites").replaceChildren(...sites.map((s) => el("span", {
    class: "site " + (s.status === "live" ? "live" : s.status === "connecting" ? "" : "down"),
    title: `${s.address}: ${s.status}`, "data-site": s.site, text: `${s.site || s.service}: ${s.status}`})));
  const filter = $("site-filter"), chosen = filter.value;
  filter.replaceChildren(el("option", {value: "", text: "all"}),
    ...sites.filter((s) => s.site).map((s) => el("option", {value: s.site, text: s.site})));
  filter.value = chosen;
  drawPeers(sites);
}

// An operator (admin token) is shown each site's peers and the streams between them, both ways.
function drawPeers(sites) {
  const rows = [];
  for (const s of sites) {
    if (typeof s.peers === "string" || (s.peers && !s.peers.length))
      rows.push(el("tr", {}, el("td", {text: s.site}), el("td", {colspan: 6, text: s.peers.length ? s.peers : "no peers"})));
    else for (const p of s.peers || []) {
      rows.push(el("tr", {"data-peer": `${s.site}/${p.name}`, "data-state": p.state},
        el("td", {text: s.site}), el("td", {text: p.name}), el("td", {class: "mono", text: p.address}),
        el("td", {class: `stream ${p.state}`, text: p.state + (p.last_error ? `: ${p.last_error}` : "")}),
        el("td", {text: when(p.since)}), el("td", {text: `${p.atoms_pending} / ${p.atoms_received}`}),
        el("td", {text: p.subscribed ? `subscribed since ${when(p.subscribed_since)}, watching ${p.atoms_watched} atoms`
                                     : "not subscribed"})));
    }
  }
  $("peers").hidden = !sites.some((s) => s.peers !== null && s.peers !== undefined);
  document.querySelector("#peers tbody").replaceChildren(...rows);
}

function connect() {
  const source = new EventSource("/api/stream");
  source.addEventListener("snapshot", (e) => {
    const data = JSON.parse(e.data);
    colours = data.colours;
    jobs.clear();
    for (const row of data.jobs) jobs.set(key(row.site, row.id), row);
    drawSites(data.sites);
    $("connection").textContent = "live";
    redraw();
  });
  source.addEventListener("update", (e) => {
    const data = JSON.parse(e.data);
    if (data.sites) drawSites(data.sites);
    let reselect = false;
    for (const row of data.jobs) {
      const old = jobs.get(key(row.site, row.id));
      jobs.set(key(row.site, row.id), row);
      if (selected && key(selected.site, selected.id) === key(row.site, row.id) && (!old || old.state !== row.state))
        reselect = true;
    }
    if (graph && data.jobs.some((row) => graph.nodes.some((n) => n.job === row.id && n.site === row.site &&
                                                                n.state !== row.state))) {
      for (const row of data.jobs) for (const n of graph.nodes) if (n.job === row.id && n.site === row.site) n.state = row.state;
      drawGraph(graph);                          // the graph's jobs are coloured by their live states
    }
    for (const point of data.points) addPoint(point);
    if (data.jobs.length) redraw();
    if (reselect) loadDetail();
  });
  source.onerror = () => { $("connection").textContent = "reconnecting…"; };
}

// -- a job's detail ----------------------------------------------------------------------

async function getJSON(path) {
  const reply = await fetch(path);
  if (!reply.ok) throw new Error(await reply.text());
  return reply.json();
}

function jobPath(suffix = "") {
  return `/api/jobs/${encodeURIComponent(selected.site)}/${encodeURIComponent(selected.id)}${suffix}`;
}

function select(site, id) {
  selected = {site, id};
  $("detail").hidden = false;
  $("logs").textContent = "";
  $("cancel-result").textContent = "";
  redraw();
  loadDetail();
}

async function loadDetail() {
  const asked = selected;
  const [detail, drawn, plot] = await Promise.allSettled(
    [getJSON(jobPath()), getJSON(jobPath("/graph")), getJSON(jobPath("/series"))]);
  if (asked !== selected) return;                  // another job was selected meanwhile
  if (detail.status === "fulfilled") drawDetail(detail.value);
  else $("detail-meta").textContent = detail.reason.message;
  graph = drawn.status === "fulfilled" ? drawn.value : null;
  if (graph) drawGraph(graph);
  series = plot.status === "fulfilled" ? plot.value : null;
  drawPlotControls();
  drawPlot();
}

function drawDetail(d) {
  $("detail-title").replaceChildren(`${d.label} `, el("span", {class: "state", id: "detail-state", text: d.state,
    bg: colours[d.state] || "#fff"}));
  const named = d.asked !== d.id ? `${d.site}/${d.asked}, a memo hit of ${d.id}` : `${d.site}/${d.id}`;
  $("detail-meta").textContent = `${named} · ${d.work} · owner ${d.owner} · attempts ${d.attempts}` +
    ` · submitted ${when(d.submitted)}` + (d.finished ? ` · finished ${when(d.finished)}` : "");
  $("cancel").disabled = ["completed", "failed", "cancelled"].includes(d.state);
  const cause = $("detail-cause");
  cause.replaceChildren();
  if (d.attention) cause.append(el("p", {text: d.attention}));
  if (d.error) cause.append(el("p", {text: `failed: ${d.error}`}));
  if (d.traceback) cause.append(el("pre", {id: "traceback", text: d.traceback}));
  if (d.cause) cause.append(el("p", {id: "cause", text: `cancelled (${d.cause.kind}): ${d.cause.message}`}));
  if (d.root_cause) {
    cause.append(el("p", {id: "root-cause", class: "root", text: `root cause: ${d.root_cause.text}`}));
    if (d.root_cause.traceback) cause.append(el("pre", {text: d.root_cause.traceback}));
  }
  if (d.result) cause.append(el("p", {class: "mono", text: `result: ${d.result}`}));
  $("outputs").replaceChildren(...d.outputs.map((o) => el("li", {},
    el("a", {class: "output", href: jobPath(`/outputs/${encodeURIComponent(o.name)}`), download: o.name,
      text: o.name}), ` ${o.size} bytes · sha256 ${o.sha256.slice(0, 12)}…`)));
  if (!d.outputs.length) $("outputs").append(el("li", {class: "note", text: "none recorded"}));
  $("memo").textContent = d.memo.hit ? `a memo hit: reused ${d.memo.job}` : d.memo.differences.join("; ");
  document.querySelector("#events tbody").replaceChildren(...d.events.map((e) => el("tr", {},
    el("td", {class: "mono", text: `#${e.seq}`}), el("td", {text: when(e.time)}), el("td", {text: e.kind}),
    el("td", {text: e.summary}))));
  $("spec").textContent = JSON.stringify(d.spec, null, 2);
}

async function showLogs(stream) {
  const reply = await fetch(jobPath(`/logs/${stream}`));
  $("logs").textContent = await reply.text() || `(nothing on ${stream} yet)`;
}

async function cancelSelected() {
  const what = jobs.get(key(selected.site, selected.id));
  if (!confirm(`Cancel ${what ? what.label : selected.id} at ${selected.site}?`)) return;
  const reply = await fetch(jobPath("/cancel"), {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({reason: "cancelled from park ui"})});
  $("cancel-result").textContent = reply.ok ? `now ${(await reply.json()).state}` : await reply.text();
  loadDetail();
}

// -- reported values ---------------------------------------------------------------------

function metrics() {
  const names = new Set(series ? series.thresholds.map((t) => t.name) : []);
  for (const line of series ? series.lines : []) for (const p of line.points) Object.keys(p.values).forEach((k) => names.add(k));
  return [...names];
}

function drawPlotControls() {
  const names = metrics(), box = $("plot-controls");
  const chosen = box.querySelector("select") ? box.querySelector("select").value : "";
  if (names.length < 2) { box.replaceChildren(); return; }
  const select = el("select", {id: "metric"}, ...names.map((n) => el("option", {value: n, text: n})));
  if (names.includes(chosen)) select.value = chosen;
  select.addEventListener("change", drawPlot);
  box.replaceChildren("value ", select);
}

function addPoint(point) {
  if (!series) return;
  const line = series.lines.find((l) => l.site === point.site && l.id === point.id);
  if (!line) return;
  line.points.push({time: point.time, values: point.values});
  if (!$("metric") && metrics().length > 1) drawPlotControls();
  drawPlot();
}

function drawPlot() {
  const box = $("plot-box");
  const names = metrics();
  const metric = $("metric") ? $("metric").value : names[0];
  const lines = series ? series.lines.filter((l) => l.points.some((p) => metric in p.values)) : [];
  if (!metric || !lines.length) { box.replaceChildren(el("p", {class: "note", text: "no values reported"})); return; }
  const W = 520, H = 230, L = 48, R = 10, T = 10, B = 28;
  const limits = series.thresholds.filter((t) => t.name === metric);
  const pts = lines.flatMap((l) => l.points.filter((p) => metric in p.values));
  const t0 = Math.min(...pts.map((p) => p.time)), t1 = Math.max(...pts.map((p) => p.time), t0 + 1);
  const ys = pts.map((p) => p.values[metric]).concat(limits.map((t) => t.value));
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 === y0) { y0 -= 1; y1 += 1; }
  const log = y0 > 0 && y1 / y0 > 50;               // a fit's chi-squared falls by orders of magnitude
  const f = log ? Math.log10 : (v) => v;
  const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
  const y = (v) => T + (f(y1) - f(v)) / (f(y1) - f(y0)) * (H - T - B);
  const svg = el("svg:svg", {id: "plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  svg.append(el("svg:line", {class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B}),
    el("svg:line", {class: "axis", x1: L, y1: T, x2: L, y2: H - B}),
    el("svg:text", {x: L - 4, y: y(y1) + 4, "text-anchor": "end", text: y1.toPrecision(3)}),
    el("svg:text", {x: L - 4, y: y(y0), "text-anchor": "end", text: y0.toPrecision(3)}),
    el("svg:text", {x: W - R, y: H - 8, "text-anchor": "end", text: `${(t1 - t0).toFixed(1)} s`}),
    el("svg:text", {x: L, y: H - 8, text: `${metric} over time${log ? " (log scale)" : ""}`}));
  for (const t of limits) {
    svg.append(el("svg:line", {class: "threshold", x1: L, x2: W - R, y1: y(t.value), y2: y(t.value)}),
      el("svg:text", {x: W - R - 2, y: y(t.value) - 3, "text-anchor": "end", fill: "#c62828",
        text: `until ${t.name} ${t.op} ${t.value}`}));
  }
  lines.forEach((line, i) => {
    const colour = PALETTE[i % PALETTE.length];
    const own = line.points.filter((p) => metric in p.values);
    const d = own.map((p, j) => `${j ? "L" : "M"}${x(p.time).toFixed(1)},${y(p.values[metric]).toFixed(1)}`).join("");
    svg.append(el("svg:path", {class: "line", d, stroke: colour, "data-id": line.id}),
      el("svg:text", {x: W - R - 4, y: T + 12 + 12 * i, "text-anchor": "end", fill: colour, text: line.label}));
  });
  box.replaceChildren(svg);
}

// -- the condition graph -----------------------------------------------------------------

function drawGraph(g) {
  const rank = new Map(g.nodes.map((n) => [n.id, 0]));
  for (let pass = 0; pass < g.nodes.length; pass++) {        // longest path from the sources: columns
    let moved = false;
    for (const e of g.edges) {
      if (rank.get(e.target) < rank.get(e.source) + 1) { rank.set(e.target, rank.get(e.source) + 1); moved = true; }
    }
    if (!moved) break;
  }
  const columns = [];
  for (const n of g.nodes) (columns[rank.get(n.id)] ||= []).push(n);
  const BW = 170, BH = 40, GX = 70, GY = 16, at = new Map();
  columns.forEach((col, c) => col.forEach((n, r) => at.set(n.id, {x: 10 + c * (BW + GX), y: 10 + r * (BH + GY)})));
  const W = 20 + columns.length * (BW + GX), H = 20 + Math.max(...columns.map((c) => c.length)) * (BH + GY);
  const svg = el("svg:svg", {id: "graph", width: W, height: H, viewBox: `0 0 ${W} ${H}`});
  const mid = (n) => n.op ? BW / 2 : 0;
  for (const e of g.edges) {
    const s = at.get(e.source), t = at.get(e.target);
    const sn = g.nodes.find((n) => n.id === e.source), tn = g.nodes.find((n) => n.id === e.target);
    const x1 = s.x + BW - mid(sn) + (sn.op ? 14 : 0), y1 = s.y + BH / 2, x2 = t.x + mid(tn) - (tn.op ? 14 : 0), y2 = t.y + BH / 2;
    svg.append(el("svg:path", {d: `M${x1},${y1} C${x1 + 40},${y1} ${x2 - 40},${y2} ${x2},${y2}`, fill: "none",
      stroke: "#777", "stroke-dasharray": e.dashed ? "4 3" : ""}));
    // A race's contestants all carry its `until`: the title says it, the plot draws it.
    const label = e.dashed ? "contestant" : e.label;
    if (label) svg.append(el("svg:text", {x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 3, "text-anchor": "middle",
      fill: "#555", text: label}, el("svg:title", {text: e.label})));
  }
  for (const n of g.nodes) {
    const p = at.get(n.id);
    if (n.op) {
      svg.append(el("svg:circle", {cx: p.x + BW / 2, cy: p.y + BH / 2, r: 14, fill: "#f4f4f4", stroke: "#777"}),
        el("svg:text", {x: p.x + BW / 2, y: p.y + BH / 2 + 3, "text-anchor": "middle", text: n.op}));
      continue;
    }
    const node = el("svg:g", {class: "node", "data-state": n.state, "data-job": n.job},
      el("svg:rect", {x: p.x, y: p.y, width: BW, height: BH, rx: 6, fill: colours[n.state] || "#fff",
        stroke: n.root ? "#1565c0" : "#777", "stroke-width": n.root ? 2.5 : 1}),
      el("svg:text", {x: p.x + 6, y: p.y + 15, text: n.label.slice(0, 30)}),
      el("svg:text", {x: p.x + 6, y: p.y + 30, fill: "#555", text: `${n.state} · ${n.site}/${n.job.slice(0, 8)}`}),
      el("svg:title", {text: n.note || n.label}));
    node.addEventListener("click", () => { if (n.state !== "unknown") select(n.site, n.job); });
    svg.append(node);
  }
  const box = $("graph-box"), root = at.get(g.root);
  box.replaceChildren(svg);
  if (root) box.scrollLeft = root.x + BW - box.clientWidth + 10;   // a wide graph shows its job, at the right
}

// -- wiring ------------------------------------------------------------------------------

window.addEventListener("DOMContentLoaded", () => {
  history.replaceState(null, "", "/");          // the secret is in the cookie now; keep it off screen
  for (const id of ["site-filter", "state-filter", "text-filter"]) $(id).addEventListener("input", () => { page = 0; redraw(); });
  document.querySelector("#jobs tbody").addEventListener("click", (e) => {   // rows are redrawn: delegate
    const tr = e.target.closest("tr");
    const row = tr && jobs.get(tr.dataset.key);
    if (row) select(row.site, row.id);
  });
  $("prev").addEventListener("click", () => { page--; redraw(); });
  $("next").addEventListener("click", () => { page++; redraw(); });
  $("cancel").addEventListener("click", cancelSelected);
  $("logs-stdout").addEventListener("click", () => showLogs("stdout"));
  $("logs-stderr").addEventListener("click", () => showLogs("stderr"));
  connect();
});
