// Beamstream dashboard page: polls the JSON API every second and redraws.
// Plain DOM and SVG, no build step. The staff token is asked for once, on the first
// action, and kept in sessionStorage (gone when the tab closes).
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "beamstreamStaffToken";
const SVG = "http://www.w3.org/2000/svg";
let selected = null;      // the collection run id the user clicked; null follows the newest
let lastDetail = "";      // the detail JSON last drawn, to redraw only on change
let shownDcid = null;     // the dcid of the collection in the detail panel (what Reprocess acts on)

function el(tag, attrs = {}, text = null) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

function say(text, kind) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = kind;
}

function fmtTime(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

// -- collections -------------------------------------------------------------------
function drawCollections(rows) {
  const body = document.getElementById("collection-rows");
  if (!rows.length) return;
  body.replaceChildren(...rows.map((c) => {
    const tr = el("tr", { class: "collection" + (c.id === currentId(rows) ? " selected" : ""), "data-id": c.id,
                          "data-state": c.state });
    const fraction = c.images_expected ? Math.min(1, c.images_analysed / c.images_expected) : 0;
    const bar = el("span", { class: "bar" });
    bar.append(el("span", { style: `width:${(100 * fraction).toFixed(1)}%` }));
    const progress = el("td", { class: "progress" });
    progress.append(bar, ` ${c.images_analysed}/${c.images_expected}`);
    const grid = c.grid ? ` ${c.grid.rows}×${c.grid.columns}` : "";
    tr.append(el("td", {}, c.id), el("td", {}, c.experiment_type + grid), el("td", {}, c.beamline),
              el("td", { class: `state state-${c.state}` }, c.state), progress,
              el("td", {}, c.best_image === null ? "" : `${c.best_image} (${c.best_image_spots} spots)`));
    tr.addEventListener("click", () => { selected = c.id; lastDetail = ""; refresh(); });
    return tr;
  }));
}

function currentId(rows) {
  if (selected && rows.some((c) => c.id === selected)) return selected;
  return rows.length ? rows[0].id : null;
}

// -- one collection: heat map or rotation plot ----------------------------------------
function colour(fraction) {
  // dark blue -> teal -> yellow, readable on white; grey for "no result yet"
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.max(0, Math.min(1, fraction)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const t = x - i;
  const c = stops[i].map((v, k) => Math.round(v + t * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawHeatMap(detail) {
  const { rows, columns } = detail.grid;
  const cell = Math.max(8, Math.min(40, Math.floor(560 / Math.max(rows, columns))));
  const svg = el("svg:svg", { id: "heatmap-svg", width: columns * cell + 2, height: rows * cell + 2,
                               "data-rows": rows, "data-columns": columns });
  const counts = detail.heat_map || [];
  const max = Math.max(1, ...counts.filter((v) => v !== null));
  counts.forEach((count, index) => {
    const r = Math.floor(index / columns), c = index % columns;
    const rect = el("svg:rect", { x: 1 + c * cell, y: 1 + r * cell, width: cell - 1, height: cell - 1,
                                  class: count === null ? "cell empty" : "cell filled",
                                  "data-row": r, "data-column": c, "data-count": count === null ? "" : count,
                                  fill: count === null ? "#dde0e5" : colour(count / max) });
    rect.append(el("svg:title", {}, `row ${r}, column ${c}: ${count === null ? "no result yet" : count + " spots"}`));
    svg.append(rect);
  });
  const centre = detail.summary && detail.summary.xray_centre;
  if (centre) {
    // Fractional grid coordinates: integer values are cell centres.
    const x = 1 + (centre.centre_column + 0.5) * cell, y = 1 + (centre.centre_row + 0.5) * cell;
    const h = Math.max(5, cell * 0.4);
    const marker = el("svg:g", { id: "xray-centre", "data-row": centre.centre_row, "data-column": centre.centre_column });
    marker.append(el("svg:line", { x1: x - h, y1: y - h, x2: x + h, y2: y + h }),
                  el("svg:line", { x1: x - h, y1: y + h, x2: x + h, y2: y - h }),
                  el("svg:title", {}, `X-ray centre: row ${centre.centre_row.toFixed(2)}, column ${centre.centre_column.toFixed(2)}`));
    svg.append(marker);
  }
  return svg;
}

function drawSeries(detail) {
  const points = detail.series;
  const width = 560, height = 220, pad = 34;
  const svg = el("svg:svg", { id: "rotation-plot", width, height, "data-points": points.length });
  if (!points.length) return svg;
  const first = points[0].image, last = points[points.length - 1].image;
  const maxSpots = Math.max(1, ...points.map((p) => p.spots));
  const dmins = points.map((p) => p.d_min).filter((d) => d !== null);
  const maxD = Math.max(1, ...dmins);
  const xs = (n) => pad + (width - 2 * pad) * (last > first ? (n - first) / (last - first) : 0.5);
  const ys = (v, max) => height - pad - (height - 2 * pad) * (v / max);
  const line = (id, colourName, pts) => el("svg:polyline", { id, fill: "none", stroke: colourName, "stroke-width": 1.5,
                                                             points: pts.join(" ") });
  svg.append(
    el("svg:line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#999" }),
    line("plot-spots", "#3b7ddd", points.map((p) => `${xs(p.image).toFixed(1)},${ys(p.spots, maxSpots).toFixed(1)}`)),
    line("plot-dmin", "#e07b21", points.filter((p) => p.d_min !== null)
      .map((p) => `${xs(p.image).toFixed(1)},${ys(p.d_min, maxD).toFixed(1)}`)),
    el("svg:text", { x: pad, y: 12 }, `spots (blue, max ${maxSpots})  ·  resolution d_min Å (orange, max ${maxD.toFixed(1)})`),
    el("svg:text", { x: pad, y: height - 8 }, `image ${first}`),
    el("svg:text", { x: width - pad - 50, y: height - 8 }, `image ${last}`),
  );
  return svg;
}

function drawDetail(detail) {
  const key = JSON.stringify(detail);
  if (key === lastDetail) return;
  lastDetail = key;
  shownDcid = detail.dcid;
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-title").textContent =
    `Collection ${detail.id}: ${detail.experiment_type}, ${detail.state}`;
  const s = detail.summary;
  let text = `${detail.images_analysed}/${detail.images_expected} images analysed`;
  if (s) {
    text += `; summary: ${s.status}, best image ${s.best_image}, ${s.total_spots} spots in all`;
    if (s.xray_centre) text += `; X-ray centre row ${s.xray_centre.centre_row.toFixed(2)}, column ${s.xray_centre.centre_column.toFixed(2)}`;
    if (s.missing_images.length) text += `; missing images ${s.missing_images.join(", ")}`;
  }
  const summary = document.getElementById("detail-summary");
  summary.textContent = text;
  summary.dataset.status = s ? s.status : "";
  document.getElementById("heatmap").replaceChildren(...(detail.grid ? [drawHeatMap(detail)] : []));
  document.getElementById("plot").replaceChildren(...(detail.grid ? [] : [drawSeries(detail)]));
}

// -- services and dead letters -----------------------------------------------------------
function drawServices(rows) {
  const body = document.getElementById("service-rows");
  if (!rows.length) return;
  body.replaceChildren(...rows.map((s) => {
    const tr = el("tr", { "data-service": s.service_id });
    tr.append(el("td", {}, s.service_id), el("td", {}, s.service_type), el("td", {}, s.host), el("td", {}, s.pid),
              el("td", { class: `state-${s.status}` }, s.status), el("td", {}, `${s.age_s} s ago`),
              el("td", {}, s.stats.images ?? ""), el("td", {}, s.stats.dead_letters ?? ""));
    return tr;
  }));
}

function drawDeadLetters(rows) {
  const body = document.getElementById("deadletter-rows");
  if (!rows.length) return;
  body.replaceChildren(...rows.map((d) => {
    const tr = el("tr", { "data-id": d.id });
    const action = el("td");
    if (!d.resolution) {
      const button = el("button", { class: "reinject", "data-id": d.id }, "Reinject");
      button.addEventListener("click", () => reinject(d.id, button));
      action.append(button);
    }
    const state = d.resolution ? `reinjected → ${d.resolution.target} by ${d.resolution.by}` : `${d.error_type}, ${d.attempts} attempt(s)`;
    tr.append(el("td", {}, d.id), el("td", {}, fmtTime(d.failed_at)), el("td", {}, d.service),
              el("td", {}, d.dcid ?? ""), el("td", {}, d.image_number ?? ""), el("td", { class: "reason" }, d.reason),
              el("td", { class: d.resolution ? "resolved" : "open" }, state), action);
    return tr;
  }));
}

// -- pipeline: lag, rates, the process monitor ---------------------------------------------
function drawPipeline(p) {
  if (p.lags.length) {
    document.getElementById("lag-rows").replaceChildren(...p.lags.map((l) => {
      const tr = el("tr", { "data-group": l.group, "data-topic": l.topic, "data-lag": l.lag });
      tr.append(el("td", {}, l.group), el("td", {}, l.topic), el("td", {}, l.lag),
                el("td", { class: l.consumers || !l.lag ? "" : "idle-group" }, l.consumers || "none"), el("td", {}, `${l.age_s} s ago`));
      return tr;
    }));
  }
  if (p.rates.length) {
    document.getElementById("rate-window").textContent = `last ${p.window_s} s`;
    document.getElementById("rate-rows").replaceChildren(...p.rates.map((r) => {
      const tr = el("tr", { "data-topic": r.topic, "data-count": r.records_last_window });
      tr.append(el("td", {}, r.topic), el("td", {}, r.per_second.toFixed(2)), el("td", {}, r.records_last_window));
      return tr;
    }));
  }
  const status = document.getElementById("monitor-status");
  if (p.monitors.length) {
    status.className = "";
    status.textContent = p.monitors.map((m) =>
      `${m.monitor_id}: ${m.workers} worker(s), wants ${m.target_workers}, lag ${m.lag} (${fmtTime(m.event_time)})`).join("; ");
  }
  document.getElementById("monitor-events").replaceChildren(...p.monitor_events.slice(0, 10).map((e) =>
    el("li", { class: `monitor-${e.kind}`, "data-code": e.code }, `${fmtTime(e.event_time)} ${e.code}: ${e.message}`)));
  drawSpools(p.spools || []);
}

// Events a producer on this host spooled while Kafka was unreachable, not yet published.
function drawSpools(spools) {
  if (!spools.length) return;
  document.getElementById("spool-rows").replaceChildren(...spools.map((s) => {
    const tr = el("tr", { "data-spool": s.name, "data-events": s.events });
    tr.append(el("td", {}, s.name), el("td", { class: s.events ? "idle-group" : "" }, s.events), el("td", {}, s.batches),
              el("td", {}, s.oldest_age_s === null ? "-" : `${Math.round(s.oldest_age_s)} s`),
              el("td", {}, s.holder_pid === null ? "nobody" : `pid ${s.holder_pid}`));
    return tr;
  }));
}

// -- actions ------------------------------------------------------------------------------
function staffToken() {
  let token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    token = window.prompt("Staff token (kept for this browser tab only):");
    if (token) sessionStorage.setItem(TOKEN_KEY, token.trim());
  }
  return token ? token.trim() : null;
}

async function act(path, what, body = null) {
  const token = staffToken();
  if (!token) { say(`${what}: cancelled (no token)`, "error"); return null; }
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== null) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method: "POST", headers, body: body === null ? null : JSON.stringify(body) });
  const answer = await response.json().catch(() => ({ error: response.statusText }));
  if (response.status === 401 || response.status === 403) sessionStorage.removeItem(TOKEN_KEY); // ask again next time
  if (!response.ok) { say(`${what} failed: ${answer.error}`, "error"); return null; }
  return answer;
}

async function reinject(id, button) {
  button.disabled = true;
  const result = await act(`/api/deadletters/${encodeURIComponent(id)}/reinject`, `reinject ${id}`);
  if (result) say(`reinjected ${id} → ${result.target} (by ${result.by})`, "ok");
  else button.disabled = false;
}

// "d_min=2.0 backend=numpy" -> {d_min: "2.0", backend: "numpy"}; the server checks keys and values.
function parseParameters(text) {
  const parameters = {};
  for (const item of text.split(/\s+/).filter(Boolean)) {
    const at = item.indexOf("=");
    if (at < 1) throw new Error(`"${item}" is not key=value`);
    parameters[item.slice(0, at)] = item.slice(at + 1);
  }
  return parameters;
}

async function reprocess(event) {
  event.preventDefault();
  if (shownDcid === null) return;
  const dcid = shownDcid;
  let parameters;
  try {
    parameters = parseParameters(document.getElementById("reprocess-params").value);
  } catch (error) {
    say(`reprocess ${dcid}: ${error.message}`, "error");
    return;
  }
  const button = document.getElementById("reprocess");
  button.disabled = true;
  try {
    const result = await act(`/api/collections/${dcid}/reprocess`, `reprocess ${dcid}`, { parameters });
    if (result) {
      say(`reprocessing ${dcid} as job ${result.processing_job_id}: ${result.images} images (by ${result.by})`, "ok");
      selected = result.run;  // follow the new run as its results come in
      lastDetail = "";
      refresh();
    }
  } finally {
    button.disabled = false;
  }
}

document.getElementById("reprocess-form").addEventListener("submit", reprocess);

// -- polling ------------------------------------------------------------------------------
async function refresh() {
  try {
    const [collections, services, deadletters, pipeline] = await Promise.all(
      [getJSON("/api/collections"), getJSON("/api/services"), getJSON("/api/deadletters"), getJSON("/api/pipeline")]);
    drawCollections(collections);
    drawServices(services);
    drawPipeline(pipeline);
    drawDeadLetters(deadletters);
    const id = currentId(collections);
    if (id) {
      const [dcid, job] = id.split("/");
      drawDetail(await getJSON(`/api/collections/${dcid}` + (job ? `?job=${job}` : "")));
    }
    document.getElementById("feed-status").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("feed-status").textContent = `cannot reach the dashboard: ${error.message}`;
  }
}

refresh();
setInterval(refresh, POLL_MS);
