// Models: every model with its versions, aliases and model-card metrics (GET /v1/models);
// promote (POST /api/models/{name}/aliases), roll back (…/rollback) and export (…/{ref}/export)
// for keys that may change the registry. Above them, what is loaded now (GET /api/ps) with load
// and unload (POST /api/models/{ref}/load|unload), and an import form (POST /api/models/import).

import { api, blob } from "./api.js";
import { $, badge, download, fmtBytes, fmtNum, fmtTime, guard, h, text } from "./ui.js";

let ctx;
let psCalls = 0; // the latest GET /api/ps wins over slower earlier ones
const drafts = new Map(); // model → the alias typed in its card, kept across re-renders

export function init(context) {
  ctx = context;
  document.body.append(h("datalist", { id: "alias-hints" },
    ["production", "latest", "staging"].map((v) => h("option", { value: v }))));
  ctx.on("models", () => {
    if (!$("#tab-models").hidden) render();
  });
  $("#ps-refresh").addEventListener("click", (e) => guard(e.currentTarget, refreshLoaded));
  $("#import-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guard(e.submitter, importModel);
  });
}

export function show() {
  const manage = ctx.can("train"); // load, unload and import need a train or admin key
  $("#import-form").hidden = !manage;
  $("#keep-alive-field").hidden = !manage;
  guard(null, () => ctx.refreshModels()); // emits "models", which renders
  guard(null, refreshLoaded);
}

// -- loaded now ---------------------------------------------------------------------------

async function refreshLoaded() {
  const mine = ++psCalls;
  const ps = await api("/api/ps");
  if (mine !== psCalls) return;
  const manage = ctx.can("train");
  const limit = ps.max_model_memory ? `limit ${fmtBytes(ps.max_model_memory)}` : "no limit";
  $("#ps-summary").textContent = `${ps.data.length} of ${ps.max_loaded_models} loaded · `
    + `${fmtBytes(ps.memory_bytes)} of weights (${limit})`;
  const rows = ps.data.map((m) => h("tr", { dataset: { model: m.model } },
    h("td", {}, h("b", {}, m.model)),
    h("td", {}, m.family),
    h("td", {}, m.task),
    h("td", { class: "num" }, fmtBytes(m.size_bytes)),
    h("td", { class: "num" }, String(m.in_use)),
    h("td", { class: "muted small" }, expiry(m.expires_at)),
    h("td", { class: "small", title: "how a text model's tokens are computed (native: the compiled kernels)" },
      m.decoding || ""),
    h("td", {}, manage ? h("button", { type: "button", class: "small-btn unload", title: `unload ${m.model} now`,
                                       onclick: (e) => guard(e.currentTarget, () => unload(m.model)) }, "Unload")
      : null)));
  if (!rows.length) {
    rows.push(h("tr", { class: "empty" }, h("td", { colspan: 8, class: "muted" },
      "Nothing is loaded: a model loads on its first request, or with Load below.")));
  }
  $("#ps-table tbody").replaceChildren(...rows);
}

/** "unloads in 4 min" from expires_at (unix seconds), or "stays loaded" when it is null. */
function expiry(expiresAt) {
  if (expiresAt === null || expiresAt === undefined) return "stays loaded";
  const seconds = Math.max(0, expiresAt - Date.now() / 1000);
  if (seconds < 60) return `unloads in ${Math.round(seconds)} s`;
  if (seconds < 7200) return `unloads in ${Math.round(seconds / 60)} min`;
  return `unloads in ${Math.round(seconds / 3600)} h`;
}

async function load(ref) {
  await api(`/api/models/${encodeURIComponent(ref)}/load`, { json: { keep_alive: $("#keep-alive").value } });
  await refreshLoaded();
}

async function unload(ref) {
  await api(`/api/models/${encodeURIComponent(ref)}/unload`, { method: "POST" });
  await refreshLoaded();
}

// -- import -------------------------------------------------------------------------------

async function importModel() {
  const form = $("#import-form");
  const out = $("#import-out");
  out.textContent = "";
  const file = form.elements.file.files[0];
  if (!file) throw new Error("choose a file to import (.zip of a model folder, or .onnx)");
  const data = new FormData();
  data.append("file", file);
  const name = text(form, "name");
  if (name) data.append("name", name); // blank: the server names it after the file
  const m = await api("/api/models/import", { form: data });
  out.textContent = `imported ${m.latest?.ref ?? m.id} (${m.family}, ${m.task})`;
  await ctx.refreshModels();
}

// -- the models list ----------------------------------------------------------------------

function render() {
  const manage = ctx.can("train"); // promote and roll back need a train or admin key
  $("#models-list").replaceChildren(...ctx.state.models.map((m) => card(m, manage)));
}

function card(m, manage) {
  const aliases = Object.entries(m.aliases || {});
  const pointedBy = (n) => aliases.filter(([, v]) => v === n).map(([a]) => a);
  const versions = [...m.versions].sort((a, b) => b.version - a.version);
  const rows = versions.map((v) => h("tr", { dataset: { version: v.version } },
    h("td", {}, h("b", {}, `@${v.version}`), " ", ...pointedBy(v.version).map((a) => badge(a, "alias"))),
    h("td", { class: "muted small" }, fmtTime(v.created)),
    h("td", { class: "num" }, fmtBytes(v.size_bytes)),
    h("td", { class: "metrics" }, metrics(v)),
    h("td", {}, h("button", { type: "button", class: "small-btn", title: `download ${v.ref} as a zip archive`,
                              onclick: (e) => guard(e.currentTarget, async () => download(
                                await blob(`/api/models/${encodeURIComponent(v.ref)}/export`),
                                `${m.id}-${v.version}.zip`)) }, "export"))));
  return h("article", { class: "card model", dataset: { model: m.id } },
    h("header", { class: "detail-head" }, h("h2", {}, m.id), badge(m.task, "task"), badge(m.family),
      h("span", { class: "spacer" }),
      h("span", { class: "muted small" }, `${versions.length} version${versions.length === 1 ? "" : "s"}`),
      manage ? h("button", { type: "button", class: "small-btn load", title: `load ${m.id} now`,
                             onclick: (e) => guard(e.currentTarget, () => load(m.id)) }, "Load") : null),
    h("table", { class: "versions" },
      h("thead", {}, h("tr", {}, ["version", "created", "size", "metrics", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)),
    manage ? controls(m, versions) : null);
}

function metrics(v) {
  const shown = Object.entries(v.metrics || {}).filter(([, x]) => typeof x === "number" || typeof x === "string");
  if (v.context_length) shown.unshift(["context", v.context_length]);
  return shown.length
    ? h("span", {}, shown.slice(0, 8).map(([k, x]) => h("span", { class: "metric" }, h("i", {}, k), " ", fmtNum(x))))
    : h("span", { class: "muted" }, "—");
}

function controls(m, versions) {
  const alias = h("input", { class: "alias-input", value: drafts.get(m.id) ?? "production", list: "alias-hints",
                             size: 10, "aria-label": "alias", oninput: (e) => drafts.set(m.id, e.target.value) });
  const version = h("select", { class: "version-picker", "aria-label": "version" },
    versions.map((v) => h("option", { value: v.version }, `@${v.version}`)));
  const promote = h("button", { type: "button", class: "primary promote", onclick: (e) => guard(e.currentTarget, async () => {
    await api(`/api/models/${encodeURIComponent(m.id)}/aliases`,
              { json: { alias: alias.value.trim(), version: Number(version.value) } });
    await ctx.refreshModels();
  }) }, "Promote");
  const rollback = h("button", { type: "button", class: "rollback", onclick: (e) => guard(e.currentTarget, async () => {
    await api(`/api/models/${encodeURIComponent(m.id)}/rollback`, { json: { alias: alias.value.trim() } });
    await ctx.refreshModels();
  }) }, "Roll back");
  return h("div", { class: "model-actions" },
    h("label", { class: "inline" }, "alias ", alias), h("label", { class: "inline" }, "version ", version), promote,
    rollback);
}
