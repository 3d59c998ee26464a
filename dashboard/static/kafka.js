// The Kafka tab: topics, messages, consumer groups (GET /api/kafka/...). Read-only: every request is a GET.
// Loaded when the tab opens and on Refresh, not polled. Uses el() from app.js.
"use strict";

const kafka = { topics: [], topic: null, group: null, lastQuery: null, loaded: false };

function kafkaSay(text, kind = "muted") {
  const message = document.getElementById("kafka-message");
  message.textContent = text;
  message.className = kind;
}

// A GET of the Kafka API; a refusal (400, 503 ...) shows its one-line reason on the page and throws.
async function kafkaGet(path) {
  const response = await fetch(path, { cache: "no-store" });
  const answer = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    kafkaSay(`${response.status}: ${answer.error}`, "error");
    throw new Error(answer.error);
  }
  return answer;
}

function emptyRow(columns, text) {
  const tr = el("tr");
  tr.append(el("td", { colspan: columns, class: "muted" }, text));
  return tr;
}

// -- tabs ---------------------------------------------------------------------------------
function showTab(name) {
  document.getElementById("overview").hidden = name !== "overview";
  document.getElementById("kafka").hidden = name !== "kafka";
  document.getElementById("tab-overview").classList.toggle("active", name === "overview");
  document.getElementById("tab-kafka").classList.toggle("active", name === "kafka");
  if (name === "kafka" && !kafka.loaded) { kafka.loaded = true; kafkaRefresh(); }
}

window.addEventListener("hashchange", () => showTab(location.hash === "#kafka" ? "kafka" : "overview"));

// -- topics -------------------------------------------------------------------------------
async function kafkaRefresh() {
  try {
    const [topics, groups] = await Promise.all([kafkaGet("/api/kafka/topics"), kafkaGet("/api/kafka/groups")]);
    kafka.topics = topics;
    drawTopics(topics);
    drawGroups(groups);
    fillTopicChoice(topics);
    if (kafka.topic) await showTopic(kafka.topic);
    if (kafka.group) await showGroup(kafka.group);
    kafkaSay(`Read-only: nothing on this tab changes the cluster. Loaded ${new Date().toLocaleTimeString()}.`);
  } catch (error) { /* said on the page */ }
}

function drawTopics(topics) {
  const body = document.getElementById("kafka-topic-rows");
  if (!topics.length) { body.replaceChildren(emptyRow(6, "no topics under this deployment's prefix")); return; }
  body.replaceChildren(...topics.map((t) => {
    const tr = el("tr", { "data-topic": t.topic, "data-messages": t.messages ?? "",
                          class: t.topic === kafka.topic ? "selected" : "" });
    tr.append(el("td", {}, t.topic), el("td", {}, t.record_types.join(", ")), el("td", {}, t.partitions),
              el("td", {}, t.replicas), el("td", { class: t.under_replicated ? "idle-group" : "" }, t.under_replicated),
              el("td", {}, t.messages ?? "?"));
    tr.addEventListener("click", () => { showTopic(t.topic); chooseTopic(t.topic); });
    return tr;
  }));
}

async function showTopic(name) {
  const detail = await kafkaGet(`/api/kafka/topics/${encodeURIComponent(name)}`);
  kafka.topic = detail.topic;
  for (const tr of document.querySelectorAll("#kafka-topic-rows tr")) {
    tr.classList.toggle("selected", tr.dataset.topic === detail.topic);
  }
  const section = document.getElementById("kafka-topic");
  section.hidden = false;
  section.dataset.topic = detail.topic;
  document.getElementById("kafka-topic-title").textContent =
    `${detail.topic}` + (detail.record_types.length ? ` (${detail.record_types.join(", ")})` : "");
  document.getElementById("kafka-topic-description").textContent = detail.description;
  document.getElementById("kafka-partition-rows").replaceChildren(...detail.partitions.map((p) => {
    const tr = el("tr", { "data-partition": p.partition, "data-low": p.low ?? "", "data-high": p.high ?? "" });
    tr.append(el("td", {}, p.partition), el("td", {}, p.leader), el("td", {}, p.replicas.join(", ")),
              el("td", { class: p.isr.length < p.replicas.length ? "idle-group" : "" }, p.isr.join(", ")),
              el("td", {}, p.low ?? "?"), el("td", {}, p.high ?? "?"), el("td", {}, p.messages ?? "?"));
    return tr;
  }));
  drawConfigs(detail.configs);
}

function drawConfigs(configs) {
  const all = document.getElementById("kafka-show-defaults").checked;
  document.getElementById("kafka-config-rows").replaceChildren(...configs.filter((c) => all || !c.default).map((c) => {
    const tr = el("tr", { "data-config": c.name, class: c.default ? "default" : "nondefault" });
    tr.append(el("td", {}, c.name), el("td", {}, c.sensitive ? "(hidden)" : c.value ?? ""),
              el("td", { class: "muted" }, c.source.replaceAll("_", " ")), el("td", {}, c.declared ?? ""));
    return tr;
  }));
  kafka.configs = configs;
}

document.getElementById("kafka-show-defaults").addEventListener("change", () => drawConfigs(kafka.configs || []));

// -- messages -----------------------------------------------------------------------------
function fillTopicChoice(topics) {
  const select = document.getElementById("kb-topic");
  const current = select.value;
  select.replaceChildren(...topics.map((t) => el("option", { value: t.topic }, t.logical ?? t.topic)));
  if (topics.some((t) => t.topic === current)) select.value = current;
  fillPartitions();
}

function fillPartitions() {
  const topic = kafka.topics.find((t) => t.topic === document.getElementById("kb-topic").value);
  const select = document.getElementById("kb-partition");
  const current = select.value;
  const count = topic ? topic.partitions : 0;
  select.replaceChildren(el("option", { value: "" }, "all"),
                         ...Array.from({ length: count }, (_, p) => el("option", { value: p }, p)));
  if (current !== "" && Number(current) < count) select.value = current;
}

function chooseTopic(name) {
  document.getElementById("kb-topic").value = name;
  fillPartitions();
}

function showStartInputs() {
  const from = document.getElementById("kb-from").value;
  document.getElementById("kb-offset").hidden = from !== "offset";
  document.getElementById("kb-time").hidden = from !== "time";
}

// The form as query parameters. A time without a zone is the browser's local time, sent as UTC; what cannot be
// read as a time is sent as typed, for the server to refuse with its reason.
function browseQuery() {
  const value = (id) => document.getElementById(id).value.trim();
  const query = new URLSearchParams();
  if (value("kb-partition") !== "") query.set("partition", value("kb-partition"));
  const from = value("kb-from");
  if (from === "offset") query.set("offset", value("kb-offset"));
  else if (from === "time") {
    const typed = value("kb-time");
    const when = /[zZ]|[+-]\d\d:?\d\d$/.test(typed) ? null : new Date(typed);
    query.set("time", when && !isNaN(when) ? when.toISOString() : typed);
  } else query.set("offset", from);
  for (const [name, id] of [["limit", "kb-limit"], ["dcid", "kb-dcid"], ["scan", "kb-scan"],
                            ["isolation", "kb-isolation"]]) {
    if (value(id) !== "") query.set(name, value(id));
  }
  return query;
}

async function browse(query) {
  const topic = document.getElementById("kb-topic").value;
  if (!topic) { kafkaSay("choose a topic first", "error"); return; }
  const button = document.getElementById("kb-browse");
  button.disabled = true;
  try {
    const answer = await kafkaGet(`/api/kafka/topics/${encodeURIComponent(topic)}/messages?${query}`);
    kafka.lastQuery = query;
    drawMessages(answer);
    kafkaSay(`Read-only: nothing on this tab changes the cluster. Browsed ${answer.topic}.`);
  } catch (error) {
    /* said on the page */
  } finally {
    button.disabled = false;
  }
}

const STOPPED = {
  end: "reached the end",
  limit: "limit reached",
  scan: "scan bound reached",
  time: "time bound reached",
};

function drawMessages(answer) {
  const ranges = Object.entries(answer.scanned).map(([p, s]) => `partition ${p} offsets ${s.first}–${s.last}`);
  const filter = answer.dcid === null ? "" : ` with dcid ${answer.dcid}`;
  const summary = document.getElementById("kb-summary");
  summary.textContent = `${answer.messages.length} message(s)${filter} of ${answer.topic}, ${answer.isolation}; ` +
    `scanned ${answer.records_scanned} record(s)` + (ranges.length ? ` (${ranges.join(", ")})` : "") +
    `; ${STOPPED[answer.stopped]}` + (answer.stopped === "scan" ? ` (${answer.scan_limit})` : "") + ".";
  summary.dataset.scanned = answer.records_scanned;
  summary.dataset.stopped = answer.stopped;
  summary.dataset.start = answer.start;
  document.getElementById("kb-rows").replaceChildren(...answer.messages.map(drawMessage));
  const next = document.getElementById("kb-next");
  next.hidden = answer.next_offset === undefined || answer.next_offset === null;
  next.dataset.offset = answer.next_offset ?? "";
}

function drawMessage(m) {
  const v = m.value;
  const tr = el("tr", { class: "message", "data-partition": m.partition, "data-offset": m.offset,
                        "data-dcid": m.dcid ?? "", "data-type": v.type ?? v.format });
  const key = m.key === null ? "(none)" : (m.key.text ?? `hex ${m.key.hex}`);
  const headers = m.headers.map((h) => `${h.name}=${h.text ?? (h.hex ? "hex " + h.hex : "null")}`).join("\n");
  tr.append(el("td", {}, m.partition), el("td", {}, m.offset), el("td", {}, m.timestamp ?? ""), el("td", {}, key),
            el("td", { title: m.dcid_from ? `from the ${m.dcid_from}` : "" }, m.dcid ?? ""),
            el("td", {}, headers), drawValue(v));
  return tr;
}

function drawValue(v) {
  const cell = el("td", { class: "value" });
  if (v.format === "tombstone") { cell.textContent = "(tombstone: no value)"; return cell; }
  if (v.format === "avro" || v.format === "json") {
    const text = JSON.stringify(v.json, null, 1);
    const details = el("details");
    details.append(el("summary", {}, v.format === "avro" ? v.type : "JSON (not Avro)"),
                   el("pre", {}, text));
    cell.append(details);
    if (v.format === "json") cell.append(el("div", { class: "muted" }, v.error));
    return cell;
  }
  cell.append(el("div", { class: "undecoded" }, `not decoded: ${v.error}`),
              el("pre", {}, v.text !== undefined ? v.text : `hex ${v.hex}`),
              el("div", { class: "muted" }, `${v.size} bytes`));
  return cell;
}

document.getElementById("kb-topic").addEventListener("change", fillPartitions);
document.getElementById("kb-from").addEventListener("change", showStartInputs);
document.getElementById("kb-isolation").addEventListener("change", () => {
  document.getElementById("kb-isolation-note").textContent =
    document.getElementById("kb-isolation").value === "read_committed"
      ? "read_committed: what consumers see; aborted transactions (a worker's retried batch) and open ones are not shown."
      : "read_uncommitted: shows records of aborted and still-open transactions too, which no Beamstream consumer sees.";
});
document.getElementById("kb-form").addEventListener("submit", (event) => { event.preventDefault(); browse(browseQuery()); });
document.getElementById("kb-next").addEventListener("click", () => {
  const query = new URLSearchParams(kafka.lastQuery);
  query.delete("time");
  query.set("offset", document.getElementById("kb-next").dataset.offset);
  browse(query);
});

// -- consumer groups -------------------------------------------------------------------------
function drawGroups(groups) {
  const body = document.getElementById("kafka-group-rows");
  if (!groups.length) { body.replaceChildren(emptyRow(4, "no consumer groups under this deployment's prefix")); return; }
  body.replaceChildren(...groups.map((g) => {
    const tr = el("tr", { "data-group": g.group, "data-state": g.state, "data-members": g.members,
                          class: g.group === kafka.group ? "selected" : "" });
    tr.append(el("td", {}, g.group), el("td", {}, g.state), el("td", {}, g.members), el("td", {}, g.assignor));
    tr.addEventListener("click", () => showGroup(g.group));
    return tr;
  }));
}

async function showGroup(name) {
  const detail = await kafkaGet(`/api/kafka/groups/${encodeURIComponent(name)}`);
  kafka.group = detail.group;
  for (const tr of document.querySelectorAll("#kafka-group-rows tr")) {
    tr.classList.toggle("selected", tr.dataset.group === detail.group);
  }
  const box = document.getElementById("kafka-group");
  box.hidden = false;
  box.dataset.group = detail.group;
  box.dataset.lag = detail.lag;
  document.getElementById("kafka-group-title").textContent =
    `${detail.group}: ${detail.state}, ${detail.members.length} member(s), lag ${detail.lag}`;
  document.getElementById("kafka-member-rows").replaceChildren(...detail.members.map((m) => {
    const tr = el("tr", { "data-client": m.client_id, "data-member": m.member_id });
    tr.append(el("td", {}, m.client_id), el("td", {}, m.host), el("td", { class: "muted" }, m.member_id),
              el("td", {}, m.assignment.map(([t, p]) => `${t}[${p}]`).join(", ")));
    return tr;
  }));
  document.getElementById("kafka-lag-rows").replaceChildren(...detail.partitions.map((r) => {
    const tr = el("tr", { "data-topic": r.topic, "data-partition": r.partition, "data-lag": r.lag,
                          "data-committed": r.committed ?? "", class: r.lag ? "behind" : "" });
    tr.append(el("td", {}, r.topic), el("td", {}, r.partition), el("td", {}, r.committed ?? "none"),
              el("td", {}, r.end), el("td", {}, r.lag), el("td", {}, r.owner ?? ""));
    return tr;
  }));
}

document.getElementById("kafka-refresh").addEventListener("click", kafkaRefresh);
showTab(location.hash === "#kafka" ? "kafka" : "overview");
