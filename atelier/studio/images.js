// Images: POST /v1/images/generations with stream=true (progress, partial previews, completed
// images with their seed and artifact id), and style transfer through POST /api/style-transfer.

import { api, sse } from "./api.js";
import { $, b64ToBlob, compact, download, facts, fillModelPicker, fmtNum, guard, h, num, pickOption, text }
  from "./ui.js";

let ctx;
let pending = null; // parameters sent from the gallery before the models were loaded

export function init(context) {
  ctx = context;
  const form = $("#image-form");
  const model = $("#image-model");
  let controller = null;

  ctx.on("models", (models) => {
    fillModelPicker(model, models, "image-generation");
    for (const s of document.querySelectorAll(".model-picker[data-task='style-transfer']")) {
      fillModelPicker(s, models, "style-transfer");
    }
    if (pending) fill(pending);
    else guard(null, () => modelChanged());
  });
  ctx.on("connected", () => {
    if (ctx.can("generate")) guard(null, loadStyles); // GET /api/styles needs a generate key
  });
  ctx.on("send-to-images", (params) => fill(params));
  model.addEventListener("change", () => guard(null, () => modelChanged()));
  $("#image-seed-random").addEventListener("click", () => { form.elements.seed.value = ""; });
  let hint = null;
  form.elements.prompt.addEventListener("input", () => {
    clearTimeout(hint);
    hint = setTimeout(() => guard(null, promptWords), 300);
  });
  model.addEventListener("change", () => guard(null, promptWords));
  $("#image-stop").addEventListener("click", () => controller?.abort());

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    controller = new AbortController();
    guard(e.submitter, () => generate(form, controller.signal));
  });
  setupStyleTransfer();
}

export function show() {}

// -- the prompt helper: POST /api/images/prompt says which words the model knows ------------

let helperTicket = 0;

async function promptWords() {
  const form = $("#image-form");
  const out = $("#image-prompt-words");
  if (!form.elements.model.value || !form.elements.prompt.value.trim()) {
    out.replaceChildren();
    return;
  }
  const ticket = ++helperTicket;
  const r = await api("/api/images/prompt", { json: { model: form.elements.model.value,
                                                      prompt: form.elements.prompt.value } });
  if (ticket !== helperTicket) return; // a later keystroke asked again
  out.replaceChildren(...r.words.map((w) => w.known
    ? h("span", { class: "word known", title: "the model knows this word" }, w.word)
    : h("span", { class: "word ignored", title: "the model ignores this word" }, w.word,
      ...w.instead.map((alt) => h("button", { type: "button", class: "small-btn instead",
        title: `use "${alt}" instead`, onclick: () => replaceWord(w.word, alt) }, `→ ${alt}`)))));
}

function replaceWord(word, instead) {
  const prompt = $("#image-form").elements.prompt;
  prompt.value = prompt.value.replace(new RegExp(`\\b${word}\\b`, "i"), instead);
  guard(null, promptWords);
}

// -- model, sizes, and parameters sent from the gallery ---------------------------------

function familyOf(ref) {
  const name = ref.split(/[:@]/)[0];
  return ctx.state.models.find((m) => m.id === name)?.family;
}

/** GET /v1/models/{id}: the sizes (and upscalers) this model version serves. */
async function modelChanged(wantSize) {
  const form = $("#image-form");
  const ref = form.elements.model.value;
  if (!ref) return;
  const gan = familyOf(ref) === "dcgan"; // one forward: no steps, guidance, negative prompt or previews
  for (const el of form.querySelectorAll(".gan-off")) el.classList.toggle("disabled", gan);
  for (const name of ["steps", "guidance", "negative_prompt", "partial_images"]) form.elements[name].disabled = gan;
  const info = await api(`/v1/models/${encodeURIComponent(ref)}`);
  if (form.elements.model.value !== ref) return; // another model was picked meanwhile
  const size = $("#image-size");
  const keep = wantSize || size.value;
  size.replaceChildren(...(info.image_sizes ?? []).map((s, i) => h("option", { value: s },
    i === 0 ? `${s} (native)` : s)));
  if (keep) pickOption(size, keep);
  const ups = info.upscalers ?? [];
  $("#image-upscaler-field").hidden = !ups.length;
  $("#image-upscaler").replaceChildren(...ups.map((u) => h("option", { value: u }, u)));
}

/** Fill the form from an artifact's parameters (the gallery's "send to Images"). */
export function fill(params) {
  if (!ctx.state.models.length) {
    pending = params;
    return;
  }
  pending = null;
  const form = $("#image-form");
  pickOption(form.elements.model, params.model);
  form.elements.prompt.value = params.prompt ?? "";
  form.elements.negative_prompt.value = params.negative_prompt ?? "";
  form.elements.n.value = 1;
  form.elements.seed.value = params.seed ?? "";
  if (params.steps !== null && params.steps !== undefined) form.elements.steps.value = params.steps;
  if (params.guidance !== null && params.guidance !== undefined) form.elements.guidance.value = params.guidance;
  guard(null, () => modelChanged(params.size));
}

// -- text to image ----------------------------------------------------------------------

function setProgress(step, total, label) {
  const bar = $("#image-progress");
  bar.dataset.step = step;
  bar.dataset.total = total;
  bar.firstElementChild.style.width = `${total ? (100 * step) / total : 0}%`;
  bar.lastElementChild.textContent = label ?? (total ? `step ${step} / ${total}` : "");
}

function resultCard(index) {
  const img = h("img", { alt: `image ${index + 1}`, class: "pixel" });
  const caption = h("figcaption", {}, h("span", { class: "muted" }, "waiting…"));
  return { el: h("figure", { class: "result pending", dataset: { index, previews: 0 } }, img, caption), img, caption };
}

async function generate(form, signal) {
  const gan = familyOf(form.elements.model.value) === "dcgan";
  const body = compact({
    model: form.elements.model.value,
    prompt: form.elements.prompt.value,
    n: num(form, "n"),
    size: form.elements.size.value || undefined,
    seed: num(form, "seed"),
    steps: gan ? undefined : num(form, "steps"),
    guidance: gan ? undefined : num(form, "guidance"),
    negative_prompt: gan ? undefined : text(form, "negative_prompt"),
    partial_images: gan ? undefined : num(form, "partial_images"),
    upscaler: $("#image-upscaler-field").hidden ? undefined : form.elements.upscaler.value,
    response_format: "b64_json",
    stream: true,
  });
  const results = $("#image-results");
  const state = $("#image-state");
  const stop = $("#image-stop");
  const cards = Array.from({ length: body.n ?? 1 }, (_, i) => resultCard(i));
  results.replaceChildren(...cards.map((c) => c.el));
  setProgress(0, 0, "starting…");
  state.textContent = "generating…";
  state.dataset.state = "running";
  stop.disabled = false;
  let done = 0;
  try {
    for await (const { data } of sse("/v1/images/generations", body, signal)) {
      if (data.type === "image_generation.progress") {
        setProgress(data.step, data.total_steps);
      } else if (data.type === "image_generation.partial_image") {
        const c = cards[data.image_index];
        c.img.src = `data:image/png;base64,${data.b64_json}`;
        c.el.dataset.previews = Number(c.el.dataset.previews) + 1;
        c.el.className = "result preview";
        c.caption.replaceChildren(h("span", { class: "muted" }, `preview · step ${data.step} / ${data.total_steps}`));
      } else if (data.type === "image_generation.completed") {
        done += 1;
        finishCard(cards[data.image_index], data, body);
        if (!Number($("#image-progress").dataset.total)) setProgress(done, cards.length, `${done} / ${cards.length} images`);
      }
    }
    state.textContent = `${done} image${done === 1 ? "" : "s"} · ${body.model}`;
    state.dataset.state = "done";
  } catch (err) {
    state.textContent = err.name === "AbortError" ? "stopped" : "failed";
    state.dataset.state = state.textContent;
    for (const c of cards) if (!c.el.classList.contains("done")) c.el.remove();
    throw err;
  } finally {
    stop.disabled = true;
  }
}

function finishCard(card, data, body) {
  const png = b64ToBlob(data.b64_json);
  card.img.src = URL.createObjectURL(png);
  card.el.className = "result done";
  card.el.dataset.seed = data.seed;
  if (data.artifact_id) card.el.dataset.artifact = data.artifact_id;
  const form = $("#image-form");
  card.caption.replaceChildren(
    h("span", { class: "seed" }, `seed ${data.seed}`),
    h("span", { class: "buttons" },
      h("button", { type: "button", class: "small-btn reuse-seed", title: "put this seed in the form",
                    onclick: () => { form.elements.seed.value = data.seed; form.elements.n.value = 1; } }, "♻ reuse seed"),
      h("button", { type: "button", class: "small-btn variations", title: "four images from the next seeds, same prompt",
                    onclick: () => {
                      form.elements.seed.value = Number(data.seed) + 1;
                      form.elements.n.value = Math.min(4, Number(form.elements.n.max) || 4);
                      form.requestSubmit();
                    } }, "✣ variations"),
      h("button", { type: "button", class: "small-btn", title: "save the PNG (parameters inside)",
                    onclick: () => download(png, `${data.artifact_id ?? `image-${data.seed}`}.png`) }, "⤓")),
    data.artifact_id ? h("a", { href: "#gallery", class: "artifact-link", title: "provenance in the gallery",
                                onclick: (e) => { e.preventDefault(); ctx.openTab("gallery");
                                                  ctx.emit("show-artifact", data.artifact_id); } },
                         data.artifact_id) : null);
  card.el.title = `${body.prompt} — seed ${data.seed}`;
}

// -- style transfer ---------------------------------------------------------------------

async function loadStyles() {
  const styles = (await api("/api/styles")).data;
  const picker = $("#style-picker");
  const keep = picker.value;
  picker.replaceChildren(...styles.map((s) => h("option", { value: s.id, title: s.title },
    `${s.artist} — ${s.title.length > 28 ? `${s.title.slice(0, 27)}…` : s.title} (${s.year})`)));
  if (keep) picker.value = keep;
}

function setupStyleTransfer() {
  const form = $("#style-form");
  const out = $("#style-out");
  form.elements.strength.addEventListener("input", () => {
    $("#style-strength-out").textContent = form.elements.strength.value;
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const file = form.elements.content.files[0];
    guard(e.submitter, async () => {
      if (!file) throw new Error("choose a content image (PNG, JPEG or WebP) first");
      const data = new FormData();
      data.append("content", file);
      for (const name of ["style", "model", "method", "size", "strength", "steps"]) {
        if (form.elements[name].value !== "") data.append(name, form.elements[name].value);
      }
      out.replaceChildren(h("p", { class: "muted" }, "transferring…"));
      let r;
      try {
        r = await api("/api/style-transfer", { form: data });
      } catch (err) {
        out.replaceChildren();
        throw err;
      }
      const item = r.data[0];
      const png = b64ToBlob(item.b64_json);
      const l = r.losses;
      out.replaceChildren(
        h("div", { class: "pair" },
          h("figure", {}, h("img", { src: URL.createObjectURL(file), alt: "content" }), h("figcaption", {}, "content")),
          h("figure", { class: "style-result" }, h("img", { src: URL.createObjectURL(png), alt: "result" }),
            h("figcaption", {}, `${r.style} · ${r.method} · ${r.size}`))),
        facts([
          ["style loss", `${fmtNum(l.style_before)} → ${fmtNum(l.style)}`
            + (l.style_before ? ` (−${Math.round(100 * (1 - l.style / l.style_before))}%)` : "")],
          ["content loss", fmtNum(l.content)],
          ["steps · strength", `${r.steps} · ${r.strength}`],
          ["time", `${r.seconds} s`],
          ["model", r.model],
          ["artifact", item.artifact_id],
        ]),
        h("div", { class: "actions" }, h("button", { type: "button", class: "small-btn",
          onclick: () => download(png, `${item.artifact_id ?? "style"}.png`) }, "⤓ download")));
    });
  });
}
