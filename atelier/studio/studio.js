// The studio's entry point: the API key box, the sidebar tabs, and the state the tabs share.
// Every tab is one module with init(ctx) and, optionally, show() / hide() when it is opened
// or left. Tabs talk through ctx: ctx.state (models, scopes), ctx.on/emit, ctx.openTab.

import { ApiError, api, setKey } from "./api.js";
import { $, $$, clearErrors, showError } from "./ui.js";
import * as write from "./write.js";
import * as poem from "./poem.js";
import * as images from "./images.js";
import * as music from "./music.js";
import * as gallery from "./gallery.js";
import * as training from "./training.js";
import * as models from "./models.js";

const TABS = { write, poem, images, music, gallery, training, models };
const STORAGE_KEY = "atelier.key";

const listeners = {};
const ctx = {
  state: { connected: false, models: [], scopes: [], keyName: null, version: null },
  on(event, fn) {
    (listeners[event] ??= []).push(fn);
  },
  emit(event, detail) {
    for (const fn of listeners[event] ?? []) fn(detail);
  },
  openTab,
  can(scope) {
    const s = ctx.state.scopes;
    return s.includes("admin") || s.includes(scope) || scope === "read";
  },
  /** Reload GET /v1/models into ctx.state.models and tell the tabs. */
  async refreshModels() {
    ctx.state.models = (await api("/v1/models")).data;
    ctx.emit("models", ctx.state.models);
    return ctx.state.models;
  },
};

// -- tabs -------------------------------------------------------------------------------

let current = null;

function openTab(name) {
  if (!TABS[name]) name = "write";
  if (current === name) return;
  if (current) TABS[current].hide?.();
  current = name;
  for (const b of $$(".sidebar button")) b.setAttribute("aria-selected", String(b.dataset.tab === name));
  for (const p of $$(".panel")) p.hidden = p.id !== `tab-${name}`;
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (ctx.state.connected) TABS[name].show?.();
}

// -- the key ----------------------------------------------------------------------------

function setStatus(state, textContent, title = "") {
  const pill = $("#key-status");
  pill.dataset.state = state;
  pill.textContent = textContent;
  pill.title = title;
}

/** Which scopes the key has: admins can list keys; others are told their scopes in the 403. */
async function discoverScopes(secret) {
  try {
    const keys = (await api("/api/keys")).data;
    const mine = keys.find((k) => !k.revoked_at && secret.startsWith(k.prefix));
    return { scopes: mine ? mine.scopes : ["admin"], name: mine ? mine.name : null };
  } catch (err) {
    const m = err instanceof ApiError && /scopes \(([^)]*)\)/.exec(err.message);
    return { scopes: m ? m[1].split(",").map((s) => s.trim()) : ["read"], name: null };
  }
}

async function serverVersion() {
  try {
    const res = await fetch("/openapi.json");
    return res.ok ? (await res.json()).info.version : null;
  } catch {
    return null;
  }
}

async function connect(secret, remember) {
  setKey(secret);
  ctx.state.connected = false;
  setStatus("busy", "checking key…");
  sessionStorage.setItem(STORAGE_KEY, secret);
  if (remember) localStorage.setItem(STORAGE_KEY, secret);
  else localStorage.removeItem(STORAGE_KEY);
  try {
    await ctx.refreshModels(); // GET /v1/models validates the key
  } catch (err) {
    setStatus("bad", err.status === 401 ? "key refused" : "server error", err.message);
    showError(err);
    return;
  }
  const [{ scopes, name }, version] = await Promise.all([discoverScopes(secret), serverVersion()]);
  Object.assign(ctx.state, { connected: true, scopes, keyName: name, version });
  const who = name ? ` “${name}”` : "";
  const v = version ? ` · Atelier ${version}` : "";
  setStatus("ok", `● ${scopes.join(" + ")} key${who}${v} · ${ctx.state.models.length} models`,
            `scopes: ${scopes.join(", ")}`);
  clearErrors();
  $("#hello").hidden = true;
  ctx.emit("connected", ctx.state);
  TABS[current]?.show?.();
}

function setupKeyBox() {
  const form = $("#key-form");
  const input = $("#key-input");
  const remember = $("#key-remember");
  const stored = sessionStorage.getItem(STORAGE_KEY) ?? localStorage.getItem(STORAGE_KEY);
  remember.checked = localStorage.getItem(STORAGE_KEY) !== null;
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const secret = input.value.trim();
    if (!secret) {
      showError(new Error("type an API key first (atelier keys create, or the key `make serve` printed)"));
      return;
    }
    connect(secret, remember.checked);
  });
  remember.addEventListener("change", () => {
    if (!remember.checked) localStorage.removeItem(STORAGE_KEY);
    else if (input.value.trim()) localStorage.setItem(STORAGE_KEY, input.value.trim());
  });
  if (stored) {
    input.value = stored;
    connect(stored, remember.checked);
  }
}

// -- start ------------------------------------------------------------------------------

for (const b of $$(".sidebar button")) b.addEventListener("click", () => openTab(b.dataset.tab));
window.addEventListener("hashchange", () => openTab(location.hash.slice(1)));
window.addEventListener("unhandledrejection", (e) => showError(e.reason));
for (const tab of Object.values(TABS)) tab.init(ctx);
openTab(location.hash.slice(1) || "write");
setupKeyBox();
