// The pdcluster dashboard: polls GET /dashboard/state, renders it, switches the policy through
// the signed-in session, and chats through /v1/chat/completions (SSE, token by token).
// Every value from the server is set as text (textContent), never parsed as HTML.
// The API key, when the user gives one, stays in this tab's sessionStorage; the cluster key never comes here.
"use strict";

const POLL_MS = 1000;
const KEY_STORE = "pdc_api_key";
const CSRF_HEADER = "X-PDC-CSRF";
const $ = (id) => document.getElementById(id);

let state = null; // the last /dashboard/state
let chatHistory = []; // the conversation sent with each chat request
let chatBusy = false;

// ------------------------------------------------------------------ helpers

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

function withKey(headers) {
  const out = Object.assign({}, headers || {});
  const key = apiKey();
  if (key) out["Authorization"] = "Bearer " + key;
  return out;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function cell(row, text, small) {
  const td = el("td", "", text);
  if (small) td.append(el("small", "", small));
  row.append(td);
  return td;
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (n >= 100 || i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "-";
  return s < 1 ? (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms" : s.toFixed(2) + " s";
}

function option(value) {
  const node = el("option", "", value);
  node.value = value;
  return node;
}

function emptyRow(tbody, columns, text) {
  const row = el("tr", "empty");
  const td = el("td", "", text);
  td.colSpan = columns;
  row.append(td);
  tbody.append(row);
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

// ------------------------------------------------------------------ state

async function poll() {
  try {
    const resp = await fetch("/dashboard/state", {headers: withKey(), cache: "no-store", credentials: "same-origin"});
    if (!resp.ok) throw new Error(await errorMessage(resp));
    state = await resp.json();
    render(state);
  } catch (e) {
    const status = $("status");
    status.textContent = "unreachable";
    status.className = "pill unreachable";
    status.title = String(e.message || e);
  }
}

function render(s) {
  const status = $("status");
  status.textContent = s.status;
  status.className = "pill " + s.status;
  status.title = "";
  renderSignIn(s);
  renderNotice(s);
  renderNodes(s.details ? s.nodes || [] : null);
  renderLinks(s.details ? s.links || [] : null);
  renderPolicy(s);
  renderRequests(s.details ? s.requests : null);
  if (s.details && !$("chat-model").options.length) loadModels();
}

function renderSignIn(s) {
  const where = $("signin-state");
  if (s.signed_in) {
    const h = Math.floor(s.session_expires_in_s / 3600), m = Math.floor((s.session_expires_in_s % 3600) / 60);
    where.textContent = `signed in (session ends in ${h} h ${m} min)`;
  } else {
    where.textContent = "read-only";
  }
  $("logout").hidden = !s.signed_in;
}

function renderNotice(s) {
  const notice = $("notice");
  const lines = [];
  if (!s.signed_in && s.can_switch) {
    lines.push(`Read-only. To switch the policy, sign in: run \`pdc dashboard --scheduler ${location.origin}\` ` +
               "where the cluster key is, and open the link it prints.");
  }
  if (!s.details) {
    lines.push("This scheduler has an API key: enter it above (kept in this tab only), or sign in, " +
               "to see its nodes, links and requests.");
  }
  notice.textContent = lines.join(" ");
  notice.hidden = lines.length === 0;
}

function renderNodes(nodes) {
  const tbody = $("nodes").tBodies[0];
  tbody.replaceChildren();
  if (nodes === null) return emptyRow(tbody, 7, "hidden: API key or sign-in needed");
  if (!nodes.length) return emptyRow(tbody, 7, "no node found yet");
  for (const n of nodes) {
    const row = el("tr");
    row.dataset.node = n.node_id;
    cell(row, n.node_id, n.address || "");
    cell(row, (n.roles || []).join(", "));
    cell(row, n.engine || "", [n.device, n.model].filter(Boolean).join(" · "));
    const hw = n.hardware || "";
    const perf = n.tflops !== undefined ? `${Number(n.tflops).toPrecision(3)} TFLOPS, ${Number(n.mem_bw_gbps).toPrecision(3)} GB/s` : "";
    cell(row, hw || perf, hw ? perf : (n.profile_source ? `(${n.profile_source})` : ""));
    const health = cell(row, "");
    const pill = el("span", "pill " + (n.health || "up"), n.health || "up");
    if (n.health_reason) pill.title = n.health_reason;
    health.append(pill);
    if (n.health_reason) health.append(el("small", "", n.health_reason));
    const active = n.active_requests || 0;
    cell(row, `${active} active`, n.running_requests !== undefined ? `${n.running_requests} decoding, ${n.active_leases || 0} leases` : "");
    const kv = cell(row, n.kv_total_bytes !== undefined ? `${bytes(n.kv_used_bytes)} / ${bytes(n.kv_total_bytes)}` : "-");
    if (n.kv_total_bytes) {
      const meter = el("div", "meter");
      const fill = el("span");
      fill.style.width = Math.min(100, (100 * n.kv_used_bytes) / n.kv_total_bytes).toFixed(1) + "%";
      meter.append(fill);
      meter.title = `leases reserve ${bytes(n.kv_reserved_bytes)}; prefix cache ${bytes(n.prefix_cache_bytes)} of ${bytes(n.prefix_cache_capacity_bytes)}`;
      kv.append(meter);
    }
    tbody.append(row);
  }
}

function renderLinks(links) {
  const tbody = $("links").tBodies[0];
  tbody.replaceChildren();
  if (links === null) return emptyRow(tbody, 4, "hidden: API key or sign-in needed");
  if (!links.length) return emptyRow(tbody, 4, "no link measured yet");
  for (const l of links) {
    const row = el("tr");
    row.dataset.link = `${l.prefill_node}->${l.decode_node}`;
    cell(row, `${l.prefill_node} → ${l.decode_node}`);
    if (l.error) {
      const td = cell(row, "probe failed");
      td.className = "error";
      td.title = l.error;
      td.colSpan = 2;
    } else {
      cell(row, Number(l.gbps).toFixed(2));
      cell(row, `${Number(l.latency_ms).toFixed(2)} ms`);
    }
    cell(row, `${Math.round(l.age_s)} s ago`);
    tbody.append(row);
  }
}

function renderPolicy(s) {
  $("policy-current").textContent = s.details ? s.policy : "hidden";
  $("kv-codec").textContent = s.details ? s.kv_codec || "?" : "hidden";
  const select = $("policy-select");
  const names = s.builtin_policies || [];
  if (select.options.length !== names.length) {
    select.replaceChildren(...names.map(option));
    if (names.includes(s.policy)) select.value = s.policy;
  }
  const allowed = Boolean(s.signed_in && s.can_switch && names.length);
  select.disabled = !allowed;
  $("policy-switch").disabled = !allowed;
  const message = $("policy-message");
  if (!allowed && !message.dataset.sticky) {
    message.textContent = s.can_switch ? "Sign in (pdc dashboard) to switch the policy." :
      "This scheduler has no admin endpoint.";
  } else if (allowed && !message.dataset.sticky) {
    message.textContent = "Built-in policies; others load with pdc policy --set SPEC.";
  }
}

async function switchPolicy() {
  const message = $("policy-message");
  const policy = $("policy-select").value;
  message.dataset.sticky = "1";
  message.className = "hint";
  try {
    const resp = await fetch("/dashboard/policy", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", [CSRF_HEADER]: (state && state.csrf) || ""},
      body: JSON.stringify({policy}),
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const body = await resp.json();
    message.textContent = `switched to ${body.policy}`;
  } catch (e) {
    message.textContent = `not switched: ${e.message}`;
    message.className = "hint error";
  }
  poll();
}

async function logout() {
  await fetch("/dashboard/logout", {method: "POST", credentials: "same-origin",
                                    headers: {[CSRF_HEADER]: (state && state.csrf) || ""}});
  poll();
}

// ------------------------------------------------------------------ requests

function renderRequests(requests) {
  const tbody = $("requests").tBodies[0];
  tbody.replaceChildren();
  if (requests === null) {
    $("requests-count").textContent = "";
    return emptyRow(tbody, 8, "hidden: API key or sign-in needed");
  }
  const all = requests.live.concat(requests.recent);
  $("requests-count").textContent = `${requests.in_flight} in flight, ${requests.recorded} since start`;
  if (!all.length) return emptyRow(tbody, 8, "no request yet");
  const span = (r) => Math.max(r.live ? r.elapsed_s : r.e2e_s, ...r.phases.map((p) => p.end_s), 0);
  const scale = Math.max(0.001, ...all.map(span));
  $("timeline-scale").textContent = `(bars share one scale: full width = ${seconds(scale)})`;
  for (const r of all) {
    const row = el("tr", r.live ? "live" : "");
    row.dataset.requestId = r.request_id;
    cell(row, r.request_id.slice(0, 20), r.route);
    cell(row, r.model);
    const stateCell = cell(row, "");
    const ok = !r.live && r.status < 400;
    stateCell.append(el("span", "pill " + (r.live ? "live" : ok ? "ok" : "bad"), r.live ? "live" : `${r.outcome} ${r.status}`));
    if (r.error) stateCell.title = r.error;
    const nodes = !r.decode_node ? "-" : r.prefill_node && r.prefill_node !== r.decode_node ?
      `${r.prefill_node} → ${r.decode_node}` : `${r.decode_node} (colocated)`;
    const nodesCell = cell(row, nodes, r.kv_codec ? `KV ${r.kv_codec}, ${bytes(r.kv_bytes)}` : "");
    nodesCell.className = "nodes";
    cell(row, r.live ? "-" : seconds(r.ttft_s));
    cell(row, seconds(r.live ? r.elapsed_s : r.e2e_s));
    cell(row, r.live ? `${r.prompt_tokens} in` : `${r.prompt_tokens} in, ${r.completion_tokens} out`);
    const bar = el("div", "bar");
    for (const p of r.phases) {
      const part = el("span", "ph-" + p.phase);
      part.style.left = ((100 * p.start_s) / scale).toFixed(2) + "%";
      part.style.width = ((100 * (p.end_s - p.start_s)) / scale).toFixed(2) + "%";
      part.title = `${p.phase}${p.node ? " on " + p.node : ""}: ${seconds(p.end_s - p.start_s)} (from ${seconds(p.start_s)})`;
      part.dataset.phase = p.phase;
      part.dataset.node = p.node;
      bar.append(part);
    }
    const td = cell(row, "");
    td.append(bar);
    tbody.append(row);
  }
}

// ------------------------------------------------------------------ chat

async function loadModels() {
  const select = $("chat-model");
  try {
    const resp = await fetch("/v1/models", {headers: withKey(), cache: "no-store"});
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const body = await resp.json();
    const ids = body.data.map((m) => m.id);
    if (ids.length) select.replaceChildren(...ids.map(option));
  } catch (e) {
    $("chat-stats").textContent = `models: ${e.message}`;
  }
}

function appendMessage(role, text) {
  const msg = el("div", "msg " + role);
  msg.append(el("b", "", role === "user" ? "you" : "assistant"));
  const body = el("span", "text", text);
  msg.append(body);
  $("chat-log").append(msg);
  return body;
}

// One SSE stream of chat.completion.chunk objects: each text delta is appended as it comes.
async function readStream(resp, out) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", reply = "", stats = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) throw new Error("the stream ended without [DONE]");
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return {reply, stats};
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          reply += delta.content;
          out.append(document.createTextNode(delta.content));
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        }
        if (chunk.pdcluster) stats = chunk.pdcluster;
      }
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || chatBusy) return;
  if (!$("chat-model").options.length) await loadModels();
  const model = $("chat-model").value;
  chatBusy = true;
  $("chat-send").disabled = true;
  input.value = "";
  appendMessage("user", text);
  const out = appendMessage("assistant", "");
  const messages = chatHistory.concat([{role: "user", content: text}]);
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: withKey({"Content-Type": "application/json"}),
      body: JSON.stringify({model, messages, stream: true, max_tokens: Number($("chat-max-tokens").value) || 64}),
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const {reply, stats} = await readStream(resp, out);
    chatHistory = messages.concat([{role: "assistant", content: reply}]);
    if (stats) {
      const where = stats.colocated ? `${stats.decode_node} (colocated)` : `${stats.prefill_node} → ${stats.decode_node}`;
      $("chat-stats").textContent = `${stats.request_id}: ${where}, TTFT ${seconds(stats.ttft_s)}, ` +
        `${stats.completion_tokens} tokens in ${seconds(stats.e2e_s)}`;
    }
  } catch (e) {
    out.parentElement.classList.add("error");
    out.append(document.createTextNode(` [${e.message}]`));
  } finally {
    chatBusy = false;
    $("chat-send").disabled = false;
    poll();
  }
}

// ------------------------------------------------------------------ start

function start() {
  const key = $("api-key");
  key.value = apiKey();
  key.addEventListener("change", () => {
    if (key.value) sessionStorage.setItem(KEY_STORE, key.value);
    else sessionStorage.removeItem(KEY_STORE);
    $("chat-model").replaceChildren();
    poll();
  });
  $("policy-switch").addEventListener("click", switchPolicy);
  $("logout").addEventListener("click", logout);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) sendChat(e);
  });
  $("chat-clear").addEventListener("click", () => {
    chatHistory = [];
    $("chat-log").replaceChildren();
    $("chat-stats").textContent = "";
  });
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
