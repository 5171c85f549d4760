// WRS cursor board: every page on a board shows every other page's pointer
// live. The page talks to a WRS server with nothing but fetch (to create and
// delete the board) and the browser's WebSocket (to relay pointer
// positions over a pub-sub channel). No build step, no library.
//
// Address:  index.html?server=http://127.0.0.1:8080#channel=ID&token=TOKEN
//   server   the WRS server (default http://127.0.0.1:8080)
//   channel, token   in the fragment: the board to join. A fragment never
//                    leaves the browser, so a static host never sees it.
//
// Messages (JSON text frames; pub-sub relays them unchanged to all others):
//   {"type":"join","id","name","x","y"}   sent once per connection; every
//                                         page that hears it answers with
//                                         its state, so newcomers see all.
//   {"type":"state","id","name","x","y"}  the sender's pointer: x and y are
//                                         fractions (0..1) of the board's
//                                         width and height, or null when the
//                                         pointer is off the board. Sent on
//                                         movement (at most every 40 ms), on
//                                         a name change and to answer a join.
//   {"type":"here","id","name"}           "still here", after 10 s without
//                                         any other message.
//   {"type":"leave","id"}                 the page leaves the board.
// A page not heard from for 30 s is taken off the board.
"use strict";

const DEFAULT_SERVER = "http://127.0.0.1:8080";
const SEND_INTERVAL_MS = 40;
const HEARTBEAT_MS = 10000;
const STALE_MS = 30000;
const MAX_RETRY_DELAY_MS = 10000;
const NAMES = ["Otter", "Lynx", "Heron", "Marten", "Ibex", "Puffin", "Gecko", "Wombat", "Kestrel", "Tapir"];
const CLOSE_REASONS = {
  1000: "closed",
  1001: "the server is shutting down",
  1006: "the connection was lost",
  1008: "the server closed the connection (policy)",
  1012: "the server asked to reconnect",
  1013: "the server is busy; trying again later",
  4001: "the board was deleted",
  4002: "the board timed out (nobody moved for too long)",
  4401: "wrong or missing token",
  4404: "no such board",
  4409: "the board is full",
};
/** Refused connects, as WRS tells browsers: close code -> the HTTP status it mirrors. */
const REFUSALS = { 4401: 401, 4404: 404, 4409: 409 };

const $ = (selector) => document.querySelector(selector);

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// --- configuration ---------------------------------------------------------

/** The WRS server's base URL (http or https, no trailing slash). */
function readServer() {
  const raw = new URLSearchParams(location.search).get("server") || DEFAULT_SERVER;
  let url;
  try {
    url = new URL(raw.replace(/^ws(s?):/i, "http$1:"));
  } catch (_) {
    return null;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return null;
  return url.origin + url.pathname.replace(/\/+$/, "");
}

const SERVER = readServer();
const WS_SERVER = SERVER === null ? null : SERVER.replace(/^http/, "ws");

function randomId() {
  const bytes = new Uint8Array(9);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function initialName() {
  try {
    const saved = localStorage.getItem("wrs-cursor-board-name");
    if (saved) return cleanName(saved);
  } catch (_) {
    // Storage may be disabled; a random name will do.
  }
  const pick = new Uint8Array(2);
  crypto.getRandomValues(pick);
  return NAMES[pick[0] % NAMES.length] + " " + (10 + (pick[1] % 90));
}

function cleanName(value) {
  const name = typeof value === "string" ? value.trim().slice(0, 32) : "";
  return name || "anonymous";
}

/** A stable colour for a page id: a hue from a small string hash. */
function hueOf(id) {
  let hash = 0;
  for (let i = 0; i < id.length; i += 1) hash = (hash * 31 + id.charCodeAt(i)) >>> 0;
  return hash % 360;
}

function fraction(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return null;
  return Math.min(1, Math.max(0, value));
}

function percent(value) {
  return value === null ? "" : Math.round(value * 100) + " %";
}

// --- state -------------------------------------------------------------------

const me = { id: randomId(), name: initialName(), x: null, y: null };
/** Other pages on the board, by id: {name, x, y, seen, cursor, item}. */
const peers = new Map();
/** The board this page is on: {id, token}, or null. */
let board = null;
let ws = null;
let retries = 0;
let retryTimer = null;
let sendTimer = null;
let lastSent = -Infinity;

// --- status and errors ---------------------------------------------------------

function setStatus(state, text, closeCode) {
  const status = $("#status");
  status.dataset.state = state;
  status.textContent = text;
  if (closeCode === undefined) delete status.dataset.closeCode;
  else status.dataset.closeCode = String(closeCode);
}

function showError(error) {
  const box = $("#error");
  $("#error-code").textContent = (error.status ? error.status + " " : "") + (error.code || "error");
  $("#error-message").textContent = error.message;
  box.dataset.error = error.code || "";
  box.hidden = false;
}

function clearError() {
  $("#error").hidden = true;
  delete $("#error").dataset.error;
}

// --- REST ----------------------------------------------------------------------

function apiToken() {
  return $("#api-token").value.trim();
}

/** Calls the WRS REST API; resolves to the JSON body, rejects with an ApiError. */
async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  const init = { method, headers };
  if (apiToken()) headers["Authorization"] = "Bearer " + apiToken();
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(SERVER + path, init);
  } catch (e) {
    throw new ApiError(0, "unreachable", "cannot reach the WRS server at " + SERVER + " (" + e.message + ")");
  }
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch (_) { json = null; }
  if (!response.ok) {
    throw new ApiError(response.status,
      json && typeof json.error === "string" ? json.error : "http_" + response.status,
      json && typeof json.message === "string" ? json.message : text || response.statusText);
  }
  return json;
}

function connectPath() {
  let path = "/channels/" + encodeURIComponent(board.id) + "/connect?token=" + encodeURIComponent(board.token);
  if (apiToken()) path += "&auth=" + encodeURIComponent(apiToken());
  return path;
}

// --- the board's link ------------------------------------------------------------

function boardFromFragment() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const id = (fragment.get("channel") || "").trim();
  const token = (fragment.get("token") || "").trim();
  return id && token ? { id, token } : null;
}

function shareLink() {
  const url = new URL(location.href);
  url.searchParams.set("server", SERVER);
  url.hash = "channel=" + encodeURIComponent(board.id) + "&token=" + encodeURIComponent(board.token);
  return url.href;
}

function showBoardInAddress() {
  const fragment = "#channel=" + encodeURIComponent(board.id) + "&token=" + encodeURIComponent(board.token);
  if (location.hash === fragment) return;
  try {
    history.replaceState(null, "", fragment);
  } catch (_) {
    // Some browsers refuse history changes on file:// pages; the share
    // field still has the link.
  }
}

// --- joining and leaving ------------------------------------------------------------

function enterBoard(id, token) {
  leaveBoard(true);
  clearError();
  board = { id, token };
  retries = 0;
  $("#board-id").textContent = id;
  $("#share-link").value = shareLink();
  $("#setup").hidden = true;
  $("#session").hidden = false;
  $("#board-hint").textContent = "Move your pointer here. Everyone with the link sees it.";
  showBoardInAddress();
  renderMe();
  connect();
}

/** Leaves the current board (telling the others when `announce`). */
function leaveBoard(announce) {
  if (retryTimer !== null) { clearTimeout(retryTimer); retryTimer = null; }
  if (sendTimer !== null) { clearTimeout(sendTimer); sendTimer = null; }
  const socket = ws;
  ws = null;
  if (socket !== null) {
    if (announce && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "leave", id: me.id }));
    }
    socket.close(1000, "left the board");
  }
  clearPeers();
}

/** Back to "create or join"; `offerAgain` fills in the board just left. */
function showSetup(offerAgain) {
  $("#session").hidden = true;
  $("#setup").hidden = false;
  $("#board-hint").textContent = "Create or join a board, then move your pointer here.";
  $("#join-id").value = offerAgain && board !== null ? board.id : "";
  $("#join-token").value = offerAgain && board !== null ? board.token : "";
  board = null;
  renderMe();
}

async function createBoard() {
  clearError();
  $("#create").disabled = true;
  try {
    const created = await api("POST", "/channels", { pattern: "pub-sub" });
    enterBoard(created.data.id, created.token);
  } catch (error) {
    showError(error);
  } finally {
    $("#create").disabled = false;
  }
}

async function deleteBoard() {
  if (board === null) return;
  clearError();
  try {
    await api("DELETE", "/channels/" + encodeURIComponent(board.id));
    // The server closes every client of the board with 4001, this page's
    // too; onClose shows it.
  } catch (error) {
    showError(error);
  }
}

// --- the WebSocket --------------------------------------------------------------

function connect() {
  setStatus(retries === 0 ? "connecting" : "reconnecting", retries === 0 ? "connecting…" : "reconnecting…");
  const socket = new WebSocket(WS_SERVER + connectPath());
  ws = socket;
  let opened = false;
  socket.onopen = () => {
    if (ws !== socket) return;
    opened = true;
    retries = 0;
    setStatus("open", "connected to " + board.id);
    send("join");
  };
  socket.onmessage = (event) => {
    if (ws === socket) receive(event.data);
  };
  socket.onclose = (event) => {
    if (ws !== socket) return; // Left on purpose, or replaced.
    ws = null;
    clearPeers();
    onClose(event, opened);
  };
}

function onClose(event, opened) {
  const code = event.code;
  if (code === 4001 || code === 4002) {
    setStatus("closed", CLOSE_REASONS[code], code);
    showError(new ApiError(0, code === 4001 ? "board_deleted" : "board_timed_out", CLOSE_REASONS[code] + "."));
    showSetup(false);
  } else if (code in REFUSALS) {
    // WRS accepted the upgrade only to say why it refuses: the reason is
    // the error code (channel_not_found, invalid_token, channel_full).
    fail(new ApiError(REFUSALS[code], event.reason || "http_" + REFUSALS[code], CLOSE_REASONS[code] + "."));
  } else if (!opened && code !== 1013) {
    diagnose();
  } else {
    reconnectLater(CLOSE_REASONS[code] || "closed with " + code);
  }
}

/**
 * A connect that failed before it opened without a refusal code (1006):
 * the server is unreachable, or it is an older WRS that refuses with an
 * HTTP status, which browsers hide. A plain GET of the same address tells.
 */
async function diagnose() {
  let response = null;
  let body = null;
  try {
    response = await fetch(SERVER + connectPath(), { headers: { "Accept": "application/json" } });
    body = await response.json();
  } catch (_) {
    // Unreachable or not JSON: try again later.
  }
  if (board === null || ws !== null) return; // Left or rejoined meanwhile.
  if (response === null || response.status === 503 || response.status === 426) {
    reconnectLater(response === null ? "cannot reach the server" : "the connection failed");
    return;
  }
  fail(new ApiError(response.status,
    body && typeof body.error === "string" ? body.error : "http_" + response.status,
    body && typeof body.message === "string" ? body.message : "the server refused the connection"));
}

function fail(error) {
  setStatus("closed", "not connected: " + error.code);
  showError(error);
  showSetup(true);
}

function reconnectLater(reason) {
  const delay = Math.min(MAX_RETRY_DELAY_MS, 500 * 2 ** retries) * (0.75 + Math.random() * 0.5);
  retries += 1;
  setStatus("reconnecting", reason + "; reconnecting in " + Math.ceil(delay / 1000) + " s");
  retryTimer = setTimeout(() => {
    retryTimer = null;
    if (board !== null && ws === null) connect();
  }, delay);
}

// --- messages ---------------------------------------------------------------------

function send(type) {
  if (ws === null || ws.readyState !== WebSocket.OPEN) return;
  const message = type === "leave" ? { type, id: me.id }
    : type === "here" ? { type, id: me.id, name: me.name }
    : { type, id: me.id, name: me.name, x: me.x, y: me.y };
  ws.send(JSON.stringify(message));
  lastSent = performance.now();
}

/** Sends this page's state now, or as soon as the rate limit allows. */
function sendStateSoon() {
  if (sendTimer !== null) return; // Already scheduled; it sends the latest position.
  const wait = lastSent + SEND_INTERVAL_MS - performance.now();
  if (wait <= 0) {
    send("state");
  } else {
    sendTimer = setTimeout(() => {
      sendTimer = null;
      send("state");
    }, wait);
  }
}

function receive(data) {
  if (typeof data !== "string") return;
  let message;
  try { message = JSON.parse(data); } catch (_) { return; }
  if (message === null || typeof message !== "object") return;
  const id = message.id;
  if (typeof id !== "string" || id === "" || id.length > 64 || id === me.id) return;
  if (message.type === "join") {
    updatePeer(id, message);
    send("state"); // So the newcomer sees this page at once.
  } else if (message.type === "state" || message.type === "here") {
    updatePeer(id, message);
  } else if (message.type === "leave") {
    removePeer(id);
  }
}

// --- drawing ----------------------------------------------------------------------

function updatePeer(id, message) {
  let peer = peers.get(id);
  if (peer === undefined) {
    const cursor = $("#cursor-template").content.firstElementChild.cloneNode(true);
    cursor.dataset.peer = id;
    cursor.style.setProperty("--hue", String(hueOf(id)));
    $("#board").append(cursor);
    const item = document.createElement("li");
    item.dataset.peer = id;
    item.style.setProperty("--hue", String(hueOf(id)));
    const dot = document.createElement("span");
    dot.className = "dot";
    const who = document.createElement("span");
    who.className = "who";
    const where = document.createElement("span");
    where.className = "where";
    item.append(dot, who, " ", where);
    $("#peers").append(item);
    peer = { cursor, item, x: null, y: null };
    peers.set(id, peer);
  }
  peer.name = cleanName(message.name);
  if (message.type !== "here") {
    peer.x = fraction(message.x);
    peer.y = fraction(message.y);
  }
  peer.seen = performance.now();

  const { cursor, item } = peer;
  cursor.querySelector(".label").textContent = peer.name;
  item.querySelector(".who").textContent = peer.name;
  if (peer.x === null || peer.y === null) {
    cursor.hidden = true;
    delete cursor.dataset.x;
    delete cursor.dataset.y;
    item.querySelector(".where").textContent = "off the board";
  } else {
    cursor.hidden = false;
    cursor.style.left = (peer.x * 100) + "%";
    cursor.style.top = (peer.y * 100) + "%";
    cursor.dataset.x = String(peer.x);
    cursor.dataset.y = String(peer.y);
    item.querySelector(".where").textContent = percent(peer.x) + ", " + percent(peer.y);
  }
  updateCount();
}

function removePeer(id) {
  const peer = peers.get(id);
  if (peer === undefined) return;
  peer.cursor.remove();
  peer.item.remove();
  peers.delete(id);
  updateCount();
}

function clearPeers() {
  for (const id of Array.from(peers.keys())) removePeer(id);
}

function updateCount() {
  const count = String(board === null || $("#session").hidden ? 0 : peers.size + 1);
  $("#peer-count").textContent = count;
  $("#peer-count").dataset.count = count;
}

function renderMe() {
  const item = $("#me");
  item.hidden = board === null || $("#session").hidden;
  item.dataset.peer = me.id;
  item.style.setProperty("--hue", String(hueOf(me.id)));
  item.querySelector(".who").textContent = me.name;
  item.querySelector(".where").textContent = me.x === null ? "off the board" : percent(me.x) + ", " + percent(me.y);
  updateCount();
}

// --- input -----------------------------------------------------------------------

/**
 * The pointer as fractions of the board's inner (padding) box: the box that
 * the remote cursors' percentages refer to, so a position maps to the same
 * spot on boards of any size.
 */
function onPointerMove(event) {
  const surface = $("#board");
  const rect = surface.getBoundingClientRect();
  if (surface.clientWidth === 0 || surface.clientHeight === 0) return;
  me.x = fraction((event.clientX - rect.left - surface.clientLeft) / surface.clientWidth);
  me.y = fraction((event.clientY - rect.top - surface.clientTop) / surface.clientHeight);
  renderMe();
  sendStateSoon();
}

function onPointerLeave() {
  me.x = null;
  me.y = null;
  renderMe();
  sendStateSoon();
}

function onNameInput() {
  me.name = cleanName($("#name").value);
  try {
    localStorage.setItem("wrs-cursor-board-name", me.name);
  } catch (_) {
    // Not saved; it still applies to this page.
  }
  renderMe();
  sendStateSoon();
}

function everyFewSeconds() {
  if (ws !== null && ws.readyState === WebSocket.OPEN && performance.now() - lastSent >= HEARTBEAT_MS) {
    send("here");
  }
  const now = performance.now();
  for (const [id, peer] of peers) {
    if (now - peer.seen > STALE_MS) removePeer(id);
  }
}

// --- start ----------------------------------------------------------------------

function start() {
  $("#error-dismiss").addEventListener("click", clearError);
  if (SERVER === null) {
    $("#server").textContent = "invalid";
    showError(new ApiError(0, "bad_server", "the ?server= parameter must be an http:// or https:// URL."));
    for (const button of document.querySelectorAll("button")) button.disabled = true;
    document.body.dataset.ready = "true";
    return;
  }
  $("#server").textContent = SERVER;
  $("#name").value = me.name;
  $("#name").addEventListener("input", onNameInput);
  $("#create").addEventListener("click", createBoard);
  $("#join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("#join-id").value.trim();
    const token = $("#join-token").value.trim();
    if (id === "" || token === "") {
      showError(new ApiError(0, "missing_field", "enter the board's id and its token."));
      return;
    }
    enterBoard(id, token);
  });
  $("#leave").addEventListener("click", () => {
    leaveBoard(true);
    setStatus("idle", "left the board");
    showSetup(true);
  });
  $("#delete").addEventListener("click", deleteBoard);
  $("#copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("#share-link").value);
      $("#copy").textContent = "Copied";
    } catch (_) {
      $("#share-link").select();
    }
  });
  const surface = $("#board");
  surface.addEventListener("pointermove", onPointerMove);
  surface.addEventListener("pointerleave", onPointerLeave);
  window.addEventListener("pagehide", () => leaveBoard(true));
  // Back from the back-forward cache: the connection was closed on pagehide.
  window.addEventListener("pageshow", (event) => {
    if (event.persisted && board !== null && ws === null) connect();
  });
  window.addEventListener("hashchange", () => {
    const linked = boardFromFragment();
    if (linked !== null && (board === null || linked.id !== board.id || linked.token !== board.token)) {
      enterBoard(linked.id, linked.token);
    }
  });
  setInterval(everyFewSeconds, 2000);

  const linked = boardFromFragment();
  if (linked !== null) enterBoard(linked.id, linked.token);
  else showSetup(false);
  document.body.dataset.ready = "true";
}

start();
