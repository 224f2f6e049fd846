// Poem: POST /api/poems (classical forms) and POST /api/poems/check, each with the per-character
// compliance report of atelier/poetry/checker.py:
//   {form, pattern, rhyme_group, lines: [{text, chars: [{char, required, tones, ok}], rhyme}],
//    violations: [{line, position, char, kind, message, suggestions?}], compliant}

import { api } from "./api.js";
import * as cowrite from "./cowrite.js";
import { $, compact, fmtNum, guard, h, num, text } from "./ui.js";

let forms = [];

export function init(ctx) {
  const form = $("#poem-form");
  const check = $("#check-form");
  const picker = $("#poem-form-picker");

  ctx.on("connected", () => guard(null, loadForms));
  cowrite.init();
  initPicture();
  picker.addEventListener("change", () => fillPatterns(picker.value));

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const keywords = text(form, "keywords");
    const body = compact({
      form: picker.value,
      pattern: text(form, "pattern"),
      acrostic: text(form, "acrostic"),
      title: text(form, "title"),
      keywords: keywords ? keywords.split(/[\s,，、]+/).filter(Boolean) : undefined,
      rhyme: text(form, "rhyme"),
      rhyme_scheme: form.elements.rhyme_scheme.value,
      script: form.elements.script.value,
      seed: num(form, "seed"),
      temperature: num(form, "temperature"),
      n: num(form, "n"),
      image: picture.dataUrl,
    });
    const out = $("#poem-out");
    guard(e.submitter, async () => {
      out.replaceChildren(h("p", { class: "muted" }, picture.dataUrl
        ? "looking at the picture, then writing…" : "searching for lines that obey the form…"));
      try {
        const r = await api("/api/poems", { json: body });
        showPictureKeywords(r.picture);
        out.replaceChildren(...r.poems.map((p) => renderPoem(p, r.model)));
      } catch (err) {
        out.replaceChildren();
        throw err;
      }
    });
  });

  check.addEventListener("submit", (e) => {
    e.preventDefault();
    const body = compact({
      text: check.elements.text.value,
      form: text(check, "form"),
      rhyme_scheme: check.elements.rhyme_scheme.value,
      suggestions: check.elements.suggestions.checked,
    });
    const out = $("#check-out");
    guard(e.submitter, async () => {
      out.replaceChildren();
      const report = await api("/api/poems/check", { json: body });
      out.replaceChildren(renderReport(report, report.title));
    });
  });
}

export function show() {}

// Image → poem: the picture travels as a data URL in the JSON body; the server's tagger turns it
// into keywords (shown as chips, with what each means and how sure it is) that the poem is built on.
const picture = { dataUrl: undefined };

function initPicture() {
  const zone = $("#poem-picture");
  const file = $("#poem-picture-file");
  const take = (f) => {
    if (!f || !f.type.startsWith("image/")) return;
    const reader = new FileReader();
    reader.onload = () => {
      picture.dataUrl = reader.result;
      $("#poem-picture-preview").src = reader.result;
      $("#poem-picture-preview").hidden = false;
      $("#poem-picture-clear").hidden = false;
      $("#poem-picture-hint").textContent = f.name;
      zone.classList.add("has-picture");
    };
    reader.readAsDataURL(f);
  };
  zone.addEventListener("click", (e) => { if (e.target.id !== "poem-picture-clear") file.click(); });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    take(e.dataTransfer.files[0]);
  });
  file.addEventListener("change", () => take(file.files[0]));
  $("#poem-picture-clear").addEventListener("click", () => {
    picture.dataUrl = undefined;
    file.value = "";
    $("#poem-picture-preview").hidden = true;
    $("#poem-picture-clear").hidden = true;
    $("#poem-picture-hint").textContent = "看图写诗 — drop a picture here (or click) to write about it";
    zone.classList.remove("has-picture");
    showPictureKeywords(undefined);
  });
}

function showPictureKeywords(seen) {
  const box = $("#poem-picture-keywords");
  box.hidden = !seen;
  if (!seen) return box.replaceChildren();
  box.replaceChildren(h("span", { class: "small muted" }, `${seen.model} sees:`),
    ...seen.keywords.map((k) => h("span", {
      class: `chip ${k.source}`, dataset: { keyword: k.keyword },
      title: k.source === "colour" ? `its colour (${Math.round(k.score * 100)} % of the picture)`
        : `${k.gloss}, ${Math.round(k.score * 100)} % sure`,
    }, `${k.keyword} ${k.gloss}`)));
}

async function loadForms() {
  forms = (await api("/api/poems/forms")).data;
  const group = (label, kind) => h("optgroup", { label },
    forms.filter((f) => f.kind === kind).map((f) => h("option", { value: f.form },
      kind === "shi" ? `${f.title} (${f.form})` : f.title)));
  const picker = $("#poem-form-picker");
  const keep = picker.value || "wujue";
  picker.replaceChildren(group("近体诗", "shi"), group("词牌", "ci"));
  picker.value = keep;
  fillPatterns(picker.value);
  const checker = $("#check-form-picker");
  const keepCheck = checker.value;
  checker.replaceChildren(h("option", { value: "" }, "detect"), group("近体诗", "shi"), group("词牌", "ci"));
  checker.value = keepCheck;
  cowrite.setForms([group("近体诗", "shi"), group("词牌", "ci")]);
}

function fillPatterns(key) {
  const f = forms.find((x) => x.form === key);
  $("#poem-pattern").replaceChildren(h("option", { value: "" }, "auto"),
    ...(f ? f.patterns : []).map((p) => h("option", { value: p }, p)));
}

function renderPoem(poem, model) {
  const meta = [
    `rhyme ${poem.rhyme_group ?? "—"}`, `seed ${poem.seed}`,
    `mean log-prob ${fmtNum(poem.mean_logprob)}`, model,
  ];
  return renderReport(poem.report, poem.title, meta, poem.text);
}

const TONE_HINT = { 平: "level tone", 仄: "oblique tone", 中: "either tone" };

/** The report as a grid: one cell per character, its required tone below, violations in red. */
export function renderReport(report, title, meta = [], plain = "") {
  const n = report.violations.length;
  const verdict = report.compliant
    ? h("div", { class: "verdict ok" }, `✓ obeys ${report.pattern}`)
    : h("div", { class: "verdict bad" }, `✗ ${n} violation${n === 1 ? "" : "s"}${report.pattern ? ` of ${report.pattern}` : ""}`);
  const lines = report.lines.map((line, i) => {
    const cells = line.chars.map((c, p) => {
      const rhyming = line.rhyme && p === line.chars.length - 1;
      const cls = ["ch", c.ok ? "ok" : "bad", rhyming ? "rhyme" : "", c.licensed ? "licensed" : "",
        c.pending ? "pending" : ""].join(" ");
      const tip = `${c.char}: requires ${c.required} (${TONE_HINT[c.required] ?? ""}); `
        + `is ${c.tones.length ? c.tones.join("/") : "unknown"}`
        + (c.reading ? ` (a polyphone, read ${c.reading.tone} in ${c.reading.by} as Tang poets read it)` : "")
        + (rhyming ? `; rhyme ${line.rhyme.group}, ${c.char} is in ${line.rhyme.char_groups.join("、") || "no group"}` : "");
      return h("span", { class: cls, title: tip, dataset: { line: i, pos: p, required: c.required } },
        h("b", {}, c.char || "·"), h("i", {}, c.required));
    });
    const tag = line.rhyme
      ? h("span", { class: `rhyme-tag ${line.rhyme.ok ? "" : "bad"}` }, `韵 ${line.rhyme.group}`) : null;
    return h("div", { class: "pline" }, h("span", { class: "lno" }, i + 1), ...cells, tag);
  });
  const violations = report.violations.map((v) => h("li", { class: `v-${v.kind}` },
    h("span", { class: "badge bad" }, v.kind), " ", v.message,
    v.suggestions?.length ? h("span", { class: "suggest" }, " — try ",
      ...v.suggestions.map((s) => h("b", {}, s))) : null));
  return h("article", { class: "poem" },
    h("header", {}, h("h3", {}, title || "无题"), verdict),
    meta.length ? h("div", { class: "muted small" }, meta.filter(Boolean).join(" · ")) : null,
    h("div", { class: "poem-grid" }, lines),
    plain ? h("pre", { class: "poem-text" }, plain) : null,
    violations.length ? h("ul", { class: "violations" }, violations) : null,
    report.notes?.length ? h("ul", { class: "notes" }, report.notes.map((note) => h("li", {},
      h("span", { class: "badge" }, note.kind), " ", note.message))) : null,
    report.couplets?.length ? h("div", { class: "couplets small muted" }, ...report.couplets.map((c) =>
      h("span", { class: `couplet ${c.parallel ? "ok" : "bad"}`, dataset: { parallel: c.parallel },
        title: `${c.matched} of ${c.positions} positions pair characters Tang poets set against each other`
          + (c.shared.length ? `; ${c.shared.join("")} is in both lines` : "") },
      `${c.name} ${c.parallel ? "对仗 ✓" : "not parallel"} `))) : null);
}
