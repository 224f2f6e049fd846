// Write together (the Poem tab): the writer types lines; POST /api/poems/check with partial: true shows,
// as they type, each character's tone against the form and the tones the positions still to write will
// need; POST /api/poems/suggest proposes the next line (or, with a mask, a rewrite of the line the
// cursor is on), each candidate from a whole compliant poem, so accepting one never leads to a dead end.

import { api } from "./api.js";
import { $, fmtNum, guard, h, text } from "./ui.js";
import { renderReport } from "./poem.js";

let pending = null; // the debounce timer of the live check
let asked = 0; // requests answered out of order are dropped

export function init() {
  const form = $("#cowrite-form");
  const area = $("#cowrite-lines");
  area.addEventListener("input", () => {
    clearTimeout(pending);
    pending = setTimeout(() => guard(null, liveCheck), 250);
  });
  $("#cowrite-form-picker").addEventListener("change", () => guard(null, liveCheck));
  form.addEventListener("submit", (e) => e.preventDefault());
  $("#cowrite-next").addEventListener("click", (e) => guard(e.currentTarget, () => suggest(null)));
  $("#cowrite-rewrite").addEventListener("click", (e) => guard(e.currentTarget, () => suggest(cursorLine())));
}

/** Fill the form picker (called by poem.js once the forms are known). */
export function setForms(groups) {
  const picker = $("#cowrite-form-picker");
  const keep = picker.value || "wujue";
  picker.replaceChildren(...groups);
  picker.value = keep;
  guard(null, liveCheck);
}

function lines() {
  return $("#cowrite-lines").value.split("\n").map((l) => l.trim()).filter(Boolean);
}

/** The index, among the written lines, of the one the cursor is on (blank rows are not lines). */
function cursorLine() {
  const area = $("#cowrite-lines");
  const row = area.value.slice(0, area.selectionStart).split("\n").length - 1;
  const index = area.value.split("\n").slice(0, row + 1).filter((l) => l.trim()).length - 1;
  return Math.max(0, index);
}

async function liveCheck() {
  const ticket = ++asked;
  const form = $("#cowrite-form-picker").value;
  if (!form) return;
  const report = await api("/api/poems/check", { json: { lines: lines(), form, partial: true } });
  if (ticket !== asked) return;
  $("#cowrite-tones").replaceChildren(renderReport(report, report.complete ? "your poem" : "so far",
    [report.complete ? "complete" : "pending positions show the tone they need"]));
}

async function suggest(rewrite) {
  const form = $("#cowrite-form-picker").value;
  const written = lines();
  const keywords = text($("#cowrite-form"), "keywords");
  const body = { form, lines: written, n: 3 };
  if (keywords) body.keywords = keywords.split(/[\s,，、]+/).filter(Boolean);
  if (rewrite !== null) {
    body.mask = written.map((line, i) => [...line].map(() => i !== rewrite));
  }
  const list = $("#cowrite-suggestions");
  list.replaceChildren(h("li", { class: "muted" }, rewrite === null ? "looking for lines that fit…"
    : `looking for another line ${rewrite + 1}…`));
  try {
    const out = await api("/api/poems/suggest", { json: body });
    list.replaceChildren(...out.suggestions.map((s) => h("li", { class: "suggestion" },
      h("b", { class: "suggested-line" }, s.line), " ",
      h("span", { class: "muted small" }, `line ${s.index + 1} · log-prob ${fmtNum(s.logprob)} · seed ${s.seed}`), " ",
      h("button", { type: "button", class: "accept", onclick: () => accept(s) }, "Accept"))));
  } catch (err) {
    list.replaceChildren();
    throw err;
  }
}

function accept(s) {
  const written = lines();
  written[s.index] = s.line;
  $("#cowrite-lines").value = written.join("\n");
  $("#cowrite-suggestions").replaceChildren();
  guard(null, liveCheck);
}
