// The Sund gateway's admin page. Everything shown comes from /api/ with the admin token as a
// bearer header; text is always set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("sund-admin-token") || "";
const samples = []; // [seconds, sequenced] for the chart
let timer = null;

async function api(path, options = {}) {
  const response = await fetch(path, {
    method: options.method || "GET",
    headers: { "Authorization": "Bearer " + token, "Content-Type": "application/json" },
    body: options.body ? JSON.stringify(options.body) : undefined,
  });
  let body = null;
  try { body = await response.json(); } catch (_) { body = { error: "the gateway answered " + response.status }; }
  if (!response.ok) {
    const error = new Error((body && body.error) || ("HTTP " + response.status));
    error.status = response.status;
    throw error;
  }
  return body;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.appendChild(td);
  return td;
}

function fill(tbodyId, items, columns, extra) {
  const tbody = $(tbodyId);
  tbody.replaceChildren();
  for (const item of items) {
    const row = document.createElement("tr");
    for (const column of columns) cell(row, item[column]);
    if (extra) extra(row, item);
    tbody.appendChild(row);
  }
}

async function signIn(event) {
  if (event) event.preventDefault();
  token = $("token").value.trim() || token;
  $("login-error").textContent = "";
  try {
    await api("/api/overview");
  } catch (e) {
    $("login-error").textContent = e.status === 401 ? "wrong token: " + e.message : e.message;
    return;
  }
  sessionStorage.setItem("sund-admin-token", token);
  $("login-view").hidden = true;
  $("admin-view").hidden = false;
  await refresh();
  if (!timer) timer = setInterval(refreshHealth, 2000);
}

function signOut() {
  sessionStorage.removeItem("sund-admin-token");
  token = "";
  location.reload();
}

async function refreshHealth() {
  try {
    const o = await api("/api/overview");
    $("health-error").textContent = o.serving ? "" : o.problem;
    $("serving").textContent = o.serving ? "serving" : "not serving";
    if (!o.serving) return;
    $("sessions").textContent = o.sessions_open;
    $("conversation-count").textContent = o.conversations;
    $("crl-version").textContent = o.crl_version;
    samples.push([Date.now() / 1000, o.sequenced]);
    if (samples.length > 151) samples.shift();
    drawChart();
  } catch (e) {
    $("health-error").textContent = e.message;
  }
}

function drawChart() {
  const rates = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i][0] - samples[i - 1][0];
    rates.push(dt > 0 ? Math.max(0, samples[i][1] - samples[i - 1][1]) / dt : 0);
  }
  $("rate").textContent = rates.length ? rates[rates.length - 1].toFixed(1) : "0";
  const top = Math.max(1, ...rates);
  const points = rates.map((r, i) => (i * 4) + "," + (78 - (r / top) * 74).toFixed(1));
  $("chart-line").setAttribute("points", points.join(" "));
}

async function refresh() {
  await refreshHealth();
  try {
    const devices = await api("/api/devices");
    fill("devices", devices, ["device", "user", "serial", "valid_until", "state"], (row, d) => {
      const td = document.createElement("td");
      if (d.state !== "revoked") {
        const button = document.createElement("button");
        button.className = "danger";
        button.textContent = "Revoke…";
        button.dataset.revoke = d.device;
        button.addEventListener("click", () => askRevoke(d.device, d.user));
        td.appendChild(button);
      }
      row.appendChild(td);
    });
    const tokens = await api("/api/tokens");
    fill("tokens", tokens, ["id", "user", "state", "expires"], (row, t) => {
      const td = document.createElement("td");
      if (t.state === "unused") {
        const button = document.createElement("button");
        button.textContent = "Expire now";
        button.dataset.expire = t.id;
        button.addEventListener("click", () => act("/api/tokens/" + encodeURIComponent(t.id) + "/expire"));
        td.appendChild(button);
      }
      row.appendChild(td);
    });
    const crl = await api("/api/crl");
    $("crl-summary").textContent = "version " + crl.version + ", issued " + crl.issued_at + " for " + crl.domain + ": " + crl.revoked.length + " revoked";
    fill("crl", crl.revoked.map((d) => ({ device: d })), ["device"]);
    const list = await api("/api/conversations");
    fill("conversations", list.conversations, ["conversation", "kind", "epoch", "members", "head", "retained"]);
  } catch (e) {
    $("action-result").textContent = e.message;
    $("action-result").className = "error";
  }
}

let pending = null;

function askRevoke(device, user) {
  pending = device;
  $("confirm-text").textContent = "Revoke " + device + " (" + user + ") for good? It never connects again, and every member is told.";
  $("confirm").hidden = false;
  $("confirm-yes").focus();
}

async function act(path) {
  try {
    const answer = await api(path, { method: "POST" });
    $("action-result").textContent = answer.done;
    $("action-result").className = "";
  } catch (e) {
    $("action-result").textContent = e.message;
    $("action-result").className = "error";
  }
  await refresh();
}

$("confirm-yes").addEventListener("click", async () => {
  $("confirm").hidden = true;
  const device = pending;
  pending = null;
  if (device) await act("/api/devices/" + encodeURIComponent(device) + "/revoke");
});
$("confirm-no").addEventListener("click", () => { pending = null; $("confirm").hidden = true; });
$("login-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", signOut);
$("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const issued = await api("/api/tokens", { method: "POST", body: { user: $("token-user").value.trim() } });
    $("new-token").textContent = "Give this to the new device (sund init --token …), it is shown once: " + issued.token;
    $("new-token").className = "";
  } catch (e) {
    $("new-token").textContent = e.message;
    $("new-token").className = "error";
  }
  await refresh();
});
$("where").textContent = location.host;
if (token) signIn();
