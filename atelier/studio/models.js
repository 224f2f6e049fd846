// Models: every model with its versions, aliases and model-card metrics (GET /v1/models);
// promote (POST /api/models/{name}/aliases), roll back (…/rollback) and export (…/{ref}/export)
// for keys that may change the registry.

import { api, blob } from "./api.js";
import { $, badge, download, fmtBytes, fmtNum, fmtTime, guard, h } from "./ui.js";

let ctx;
const drafts = new Map(); // model → the alias typed in its card, kept across re-renders

export function init(context) {
  ctx = context;
  document.body.append(h("datalist", { id: "alias-hints" },
    ["production", "latest", "staging"].map((v) => h("option", { value: v }))));
  ctx.on("models", () => {
    if (!$("#tab-models").hidden) render();
  });
}

export function show() {
  guard(null, () => ctx.refreshModels()); // emits "models", which renders
}

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
      h("span", { class: "muted small" }, `${versions.length} version${versions.length === 1 ? "" : "s"}`)),
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
