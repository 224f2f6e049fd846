// Training: fine-tuning jobs (GET /v1/fine_tuning/jobs), one job's status, events and loss
// curves (events of type "metrics" carry data.step with train_loss and/or valid_loss),
// refreshed every few seconds while the tab is open; upload a file and create a job.

import { api } from "./api.js";
import { linePlot } from "./plot.js";
import { $, badge, compact, facts, fmtBytes, fmtNum, fmtTime, guard, h, num, text } from "./ui.js";

const FINAL = ["succeeded", "failed", "cancelled"];
const REFRESH_MS = 2000;
const FAMILIES = ["chargpt", "sklearn", "ddpm", "dcgan"];

let ctx;
let timer = null;
let selected = null; // {id, events: [], job}
const calls = { jobs: 0, files: 0 }; // the latest call of each list wins over slower earlier ones

export function init(context) {
  ctx = context;
  $("#jobs-refresh").addEventListener("click", (e) => guard(e.currentTarget, refresh));
  $("#job-upload").addEventListener("click", (e) => guard(e.currentTarget, upload));
  $("#job-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guard(e.submitter, create);
  });
  ctx.on("models", (models) => {
    const tunable = models.filter((m) => m.family === "chargpt").map((m) => m.id);
    $("#job-models").replaceChildren(...[...tunable, ...FAMILIES].map((v) => h("option", { value: v })));
  });
}

export function show() {
  if (!ctx.can("train")) {
    $("#jobs-list").replaceChildren(h("p", { class: "muted" },
      `This key (${ctx.state.scopes.join(", ")}) cannot see jobs: fine-tuning needs a train or admin key.`));
    return;
  }
  guard(null, async () => {
    await Promise.all([refresh(), loadFiles()]);
  });
  clearInterval(timer);
  let busy = false; // a slow server is not asked again before it answers
  timer = setInterval(() => {
    if (document.hidden || busy) return;
    busy = true;
    guard(null, refresh).finally(() => { busy = false; });
  }, REFRESH_MS);
}

export function hide() {
  clearInterval(timer);
  timer = null;
}

async function refresh() {
  const mine = ++calls.jobs;
  const jobs = (await api("/v1/fine_tuning/jobs?limit=50")).data;
  if (mine !== calls.jobs) return;
  const list = $("#jobs-list");
  list.replaceChildren(...jobs.map((j) => h("button", {
    type: "button", class: `job-row ${selected?.id === j.id ? "selected" : ""}`, dataset: { id: j.id, status: j.status },
    onclick: () => guard(null, () => select(j.id)),
  }, h("span", { class: "job-id" }, j.id.replace(/^ftjob-/, "").slice(0, 10)),
     h("span", {}, j.suffix ? `${j.model} → ${j.suffix}` : j.model),
     statusBadge(j.status), h("span", { class: "muted small" }, fmtTime(j.created_at)))));
  if (!jobs.length) list.append(h("p", { class: "muted" }, "No jobs yet: upload a file and create one below."));
  if (selected && !FINAL.includes(selected.job?.status)) await loadJob();
}

function statusBadge(status) {
  const kind = { succeeded: "ok", failed: "bad", cancelled: "bad", running: "run", queued: "", validating_files: "" };
  return h("span", { class: `badge status ${kind[status] ?? ""}`, dataset: { status } }, status);
}

async function select(id) {
  selected = { id, events: [], job: null };
  for (const r of document.querySelectorAll(".job-row")) r.classList.toggle("selected", r.dataset.id === id);
  await loadJob();
}

/** The job, and its new events since the last call (order=asc, after the last id seen). */
function loadJob() {
  const sel = selected;
  sel.loading ??= fetchJob(sel).finally(() => { sel.loading = null; }); // one request at a time per job
  return sel.loading;
}

async function fetchJob(sel) {
  const job = await api(`/v1/fine_tuning/jobs/${sel.id}`);
  for (;;) {
    const after = sel.events.length ? `&after=${sel.events[sel.events.length - 1].id}` : "";
    const page = await api(`/v1/fine_tuning/jobs/${sel.id}/events?order=asc&limit=1000${after}`);
    sel.events.push(...page.data);
    if (!page.has_more) break;
  }
  sel.job = job;
  if (selected === sel) renderJob(sel);
}

function renderJob({ job, events }) {
  const train = [];
  const valid = [];
  for (const e of events) {
    const d = e.data || {};
    if (typeof d.step !== "number") continue;
    const t = d.train_loss ?? d.loss;
    if (typeof t === "number") train.push([d.step, t]);
    if (typeof d.valid_loss === "number") valid.push([d.step, d.valid_loss]);
  }
  const cancel = h("button", {
    type: "button", class: "danger", id: "job-cancel", disabled: FINAL.includes(job.status),
    onclick: (e) => guard(e.currentTarget, async () => {
      await api(`/v1/fine_tuning/jobs/${job.id}/cancel`, { method: "POST" });
      await loadJob();
    }),
  }, "Cancel job");
  const last = train[train.length - 1];
  const hyper = Object.entries(job.hyperparameters || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ");
  $("#job-detail").replaceChildren(
    h("header", { class: "detail-head" }, h("h2", {}, job.id), statusBadge(job.status), h("span", { class: "spacer" }),
      cancel),
    facts([
      ["model", job.model], ["family", job.family], ["new model", job.fine_tuned_model],
      ["training file", job.training_file], ["validation file", job.validation_file],
      ["hyper-parameters", hyper], ["seed", job.seed], ["created", fmtTime(job.created_at)],
      ["finished", job.finished_at ? fmtTime(job.finished_at) : undefined], ["attempts", job.attempts],
      ["last loss", last ? `${fmtNum(last[1])} at step ${last[0]}` : undefined],
      ["error", job.error ? (job.error.message ?? JSON.stringify(job.error)) : undefined],
    ]),
    h("div", { class: "plot-box", id: "job-plot" }, linePlot([
      { name: "train loss", className: "s-train", points: train },
      { name: "valid loss", className: "s-valid", points: valid },
    ], { xLabel: "step", yLabel: "loss" })),
    h("h3", {}, `Events (${events.length})`),
    h("ol", { class: "events", reversed: true }, [...events].reverse().map((e) =>
      h("li", { class: `ev-${e.level}` }, h("span", { class: "muted small" }, fmtTime(e.created_at)),
        e.level !== "info" ? badge(e.level, e.level === "error" ? "bad" : "warn") : null, " ", e.message))));
}

// -- new job ------------------------------------------------------------------------------

async function loadFiles(pick) {
  const mine = ++calls.files;
  const files = (await api("/v1/files?purpose=fine-tune")).data;
  if (mine !== calls.files) return;
  const select = $("#job-file");
  const keep = pick || select.value;
  select.replaceChildren(...files.map((f) => h("option", { value: f.id },
    `${f.filename} · ${f.format} · ${f.records ?? "?"} records · ${fmtBytes(f.bytes)}`)));
  if (!files.length) select.append(h("option", { value: "" }, "no file yet: upload one"));
  if (keep && files.some((f) => f.id === keep)) select.value = keep;
}

async function upload() {
  const form = $("#job-form");
  const file = form.elements.upload.files[0];
  if (!file) throw new Error("choose a file to upload (.jsonl, .txt, .csv, .npz or .zip)");
  const data = new FormData();
  data.append("purpose", "fine-tune");
  data.append("file", file);
  const f = await api("/v1/files", { form: data });
  $("#job-upload-out").textContent = `${f.duplicate ? "already uploaded" : "uploaded"}: ${f.id} · ${f.format} · `
    + `${f.records} records`;
  await loadFiles(f.id);
}

async function create() {
  const form = $("#job-form");
  let extra = {};
  const raw = text(form, "extra");
  if (raw) {
    try {
      extra = JSON.parse(raw);
    } catch (e) {
      throw new Error(`more hyper-parameters: not valid JSON (${e.message})`);
    }
  }
  const job = await api("/v1/fine_tuning/jobs", {
    json: compact({
      model: text(form, "model"),
      training_file: form.elements.training_file.value,
      suffix: text(form, "suffix"),
      seed: num(form, "seed"),
      hyperparameters: compact({
        n_epochs: num(form, "n_epochs"), batch_size: num(form, "batch_size"),
        learning_rate_multiplier: num(form, "learning_rate_multiplier"), max_steps: num(form, "max_steps"), ...extra,
      }),
    }),
  });
  selected = { id: job.id, events: [], job: null };
  await refresh();
  await loadJob();
}
