// Music: folk tunes in ABC notation.
//   POST /api/music          → tunes, each {abc, report, seed, artifact_id}; the report says whether
//                              every bar scans: {valid, meter, key, unit, bars, pickup, repeats,
//                              endings, wrong_bars, bar_lengths: [{number, line, col, length, expected,
//                              status, ok}]}
//   POST /api/music/check    → the same report for the ABC in the textarea, or a 400 naming line and column
//   POST /api/music/render   → the sound (WAV) and the downloads (MIDI, WAV)
// The score is engraved in the page by abcjs (vendor/abcjs/, which `make` fetches from npm: nothing
// comes from a CDN). The sound is the server's WAV in an <audio>; abcjs's TimingCallbacks only moves
// the highlight over the notes, kept on the audio's clock (abcjs's own synth would fetch soundfonts).
//
// Transposition is a view: the ABC stays as written; the score is drawn with abcjs's visualTranspose
// and the sound and downloads ask the server for `transpose` semitones.

import { ApiError, api } from "./api.js";
import { $, $$, compact, download, fillModelPicker, guard, h, num, pickOption, text } from "./ui.js";

const ABCJS_FILE = "vendor/abcjs/abcjs-basic-min.js";
const ABCJS_VERSION = "6.7.2";
const MUSIC_TASK = "music-generation"; // the models the picker offers (abc-gpt's task)
const PRIME_BARS = 4; // "Continue this tune" sends this many full bars (and the pickup)
const MAX_TRANSPOSE = 12;
const EDIT_DELAY_MS = 300; // re-engrave once typing pauses
const DRIFT_MS = 80; // the highlight is put back on the audio's clock when it strays further

let ctx;
let abcjs = null; // window.ABCJS, or null when vendor/abcjs is missing
const tune = {
  abc: "", // what the score shows (the textarea, once engraved)
  report: null, // the last report, and the ABC it is about (an edit makes it stale)
  reportAbc: null,
  model: null,
  seed: null,
  artifactId: null,
};
let transpose = 0;
let visual = null; // abcjs's TuneObject of the score shown
let sound = { key: null, blob: null, url: null }; // the last WAV rendered, and what it was rendered from
let timer = null; // ABCJS.TimingCallbacks over `visual`, while playing
let lit = []; // the SVG elements highlighted now
let cursor = null; // the <line> that marks the note playing
let editTimer = null;

export function init(context) {
  ctx = context;
  abcjs = window.ABCJS ?? null;
  const form = $("#music-form");
  const abcBox = $("#music-abc");
  const audio = $("#music-audio");

  if (!abcjs) {
    $("#music-paper").replaceChildren(h("p", { class: "music-missing" },
      h("strong", {}, "The score cannot be drawn: abcjs is not installed. "),
      `The studio serves it from ${ABCJS_FILE}, which \`make serve\` (or \`make test\`) fetches from npm `
      + `(abcjs ${ABCJS_VERSION}). Run it, then reload this page. Tunes can still be generated, checked, `
      + "played and downloaded."));
  } else if (!abcjs.signature?.endsWith(`v${ABCJS_VERSION}`)) {
    console.warn(`the studio was written for abcjs ${ABCJS_VERSION}, this is ${abcjs.signature}`);
  }

  ctx.on("models", (models) => fillModelPicker(form.elements.model, models, MUSIC_TASK));
  ctx.on("open-tune", (t) => { // from the gallery: shown, then checked (its report was not stored)
    setTune(t);
    ctx.openTab("music");
    guard($("#music-check"), check);
  });
  form.elements.shape.addEventListener("change", () => {
    form.elements.bars.disabled = form.elements.shape.value !== "bars";
  });
  form.elements.instrument.addEventListener("change", soundSettingsChanged);
  form.elements.tempo.addEventListener("change", soundSettingsChanged);
  form.elements.chords.addEventListener("change", soundSettingsChanged);

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    guard(e.submitter, () => generate(request(form)));
  });
  $("#music-continue").addEventListener("click", (e) => guard(e.currentTarget, () => continueTune(form)));

  abcBox.addEventListener("input", () => {
    clearTimeout(editTimer);
    editTimer = setTimeout(() => {
      tune.abc = abcBox.value;
      tune.artifactId = null; // an edited tune is no longer the stored one
      engrave();
      showReport();
    }, EDIT_DELAY_MS);
  });
  $("#music-check").addEventListener("click", (e) => guard(e.currentTarget, check));

  $("#music-play").addEventListener("click", (e) => guard(e.currentTarget, play));
  $("#music-stop").addEventListener("click", stop);
  $("#music-down").addEventListener("click", () => setTranspose(transpose - 1));
  $("#music-up").addEventListener("click", () => setTranspose(transpose + 1));
  for (const b of $$("#tab-music [data-download]")) {
    b.addEventListener("click", () => guard(b, () => save(b.dataset.download)));
  }

  // The highlight follows the audio: started, paused and moved by the <audio>'s own events.
  audio.addEventListener("playing", () => timer?.start(audio.currentTime, "seconds"));
  audio.addEventListener("pause", () => timer?.pause());
  audio.addEventListener("seeked", () => timer?.setProgress(audio.currentTime, "seconds"));
  audio.addEventListener("timeupdate", () => {
    $("#music-time").textContent = `${clock(audio.currentTime)} / ${clock(audio.duration)}`;
    if (timer && !audio.paused && Math.abs(timer.currentMillisecond() - 1000 * audio.currentTime) > DRIFT_MS) {
      timer.setProgress(audio.currentTime, "seconds");
    }
  });
  audio.addEventListener("ended", stop);
}

export function show() {}

export function hide() {
  stop();
}

// -- generate -------------------------------------------------------------------------------

/** The form as a POST /api/music body (blank fields left to the server's defaults). */
function request(form) {
  const byBars = form.elements.shape.value === "bars";
  return compact({
    model: form.elements.model.value || undefined,
    title: text(form, "title"),
    meter: form.elements.meter.value,
    key: form.elements.key.value,
    form: byBars ? null : form.elements.shape.value, // null: no form, just the bars (the server's default is AABB)
    bars: byBars ? num(form, "bars") : undefined,
    chords: form.elements.chords.checked,
    temperature: num(form, "temperature"),
    seed: num(form, "seed"),
    n: 1,
  });
}

async function generate(body) {
  const state = $("#music-state");
  state.textContent = body.prime ? "continuing the tune…" : "composing…";
  state.dataset.state = "running";
  let r;
  try {
    r = await api("/api/music", { json: body });
  } catch (err) {
    state.textContent = "failed";
    state.dataset.state = "failed";
    throw err;
  }
  const t = r.tunes[0];
  setTune({ abc: t.abc, report: t.report, model: r.model, seed: t.seed, artifactId: t.artifact_id });
}

/** Show a tune: the textarea, the score (untransposed), its report, and what it can do now. */
function setTune({ abc, report = null, model = null, seed = null, artifactId = null }) {
  stop();
  Object.assign(tune, { abc, report, reportAbc: report ? abc : null, model, seed, artifactId });
  $("#music-abc").value = abc;
  $("#music-check-out").replaceChildren();
  transpose = 0;
  $("#music-transpose").textContent = "0";
  const state = $("#music-state");
  state.textContent = [model, seed !== null ? `seed ${seed}` : null, artifactId].filter(Boolean).join(" · ");
  state.dataset.state = "done";
  engrave();
  showReport();
}

/** "Continue this tune": a new tune from the same header whose first bars are this one's. */
async function continueTune(form) {
  const facts = tune.report && tune.reportAbc === tune.abc ? tune.report : null;
  const header = headerOf(tune.abc);
  const meter = facts?.meter ?? header.M;
  const key = facts?.key ?? header.K;
  if (meter) pickOption(form.elements.meter, meter);
  if (key) pickOption(form.elements.key, key);
  const prime = openingBars(tune.abc, PRIME_BARS + (facts?.pickup ? 1 : 0));
  if (!prime) throw new Error("this tune has no bars to continue: write or generate one first");
  await generate(compact({ ...request(form), unit: facts?.unit ?? header.L, prime,
                           title: text(form, "title") ?? header.T }));
}

/** The header's fields (first of each): {X, T, M, L, K, …}. */
function headerOf(abc) {
  const fields = {};
  for (const line of abc.split("\n")) {
    const m = /^([A-Za-z]):(.*)$/.exec(line.trim());
    if (!m) continue;
    if (!(m[1] in fields)) fields[m[1]] = m[2].split("%")[0].trim();
    if (m[1] === "K") break; // K: ends the header
  }
  return fields;
}

/**
 * The music after K: up to and including the `count`-th bar line: `"A|dfa afd|..."` → `"A|dfa afd|"`
 * for count 2. A bar line counts once music came before it (`:|` then `|:` on the next line is one);
 * what is inside chord symbols ("…"), inline fields ([K:…]) and comments (%…) does not count.
 */
export function openingBars(abc, count) {
  const lines = abc.split("\n");
  const body = lines.slice(lines.findIndex((l) => /^K:/.test(l.trim())) + 1).join("\n");
  const skipTo = (i, end) => (body.indexOf(end, i + 1) < 0 ? body.length : body.indexOf(end, i + 1));
  let bars = 0;
  let music = false; // notes since the last bar line
  for (let i = 0; i < body.length; i++) {
    const c = body[i];
    if (c === '"') {
      i = skipTo(i, '"');
    } else if (c === "%") {
      i = skipTo(i, "\n");
    } else if (c === "[" && /^\[[A-Za-z]:/.test(body.slice(i, i + 3))) {
      i = skipTo(i, "]");
    } else if (c === "|" || (c === ":" && body[i + 1] === ":")) {
      while (i + 1 < body.length && "|:]".includes(body[i + 1])) i += 1; // one bar line: |, ||, :|, |:, |], ::
      if (!music) continue;
      bars += 1;
      music = false;
      if (bars === count) return body.slice(0, i + 1).trim();
    } else if (!/\s/.test(c)) {
      music = true;
    }
  }
  return bars ? body.trim() : "";
}

// -- the score ------------------------------------------------------------------------------

/**
 * ABCJS.renderAbc under the studio's CSP (style-src 'self': no inline styles). abcjs 6.7.2 writes
 * `style` attributes (on the hidden <svg> it measures text in, and chord-symbol superscripts) and
 * puts a <style> in each score (no text selection while notes are dragged, which we don't use). So
 * the score is drawn off the page, its style attributes set through the CSSOM (el.style.cssText,
 * which CSP allows), and its <style> dropped before it is shown.
 */
function renderOffPage(abc, params) {
  const sheet = h("div", { class: "sheet" });
  const setAttribute = Element.prototype.setAttribute;
  Element.prototype.setAttribute = function setAttributeNoInlineStyle(name, value) {
    if (String(name).toLowerCase() === "style") this.style.cssText = value;
    else setAttribute.call(this, name, value);
  };
  let tunes;
  try {
    tunes = abcjs.renderAbc(sheet, abc, params);
  } finally {
    Element.prototype.setAttribute = setAttribute;
  }
  for (const style of sheet.querySelectorAll("style")) style.remove();
  return { sheet, visual: tunes[0] ?? null };
}

/** Draw tune.abc, transposed by `transpose`, and mark the bars the report found wrong. */
function engrave() {
  stop();
  const paper = $("#music-paper");
  const warnings = $("#music-warnings");
  setEnabled(Boolean(tune.abc.trim()));
  if (!abcjs) return;
  if (!tune.abc.trim()) {
    visual = null;
    paper.replaceChildren(h("p", { class: "muted" }, "No ABC to engrave."));
    warnings.textContent = "";
    return;
  }
  const drawn = renderOffPage(tune.abc, { responsive: "resize", add_classes: true, visualTranspose: transpose,
                                         paddingtop: 8, paddingbottom: 8, paddingleft: 12, paddingright: 12 });
  visual = drawn.visual;
  paper.replaceChildren(drawn.sheet);
  paper.dataset.transpose = transpose;
  // abcjs's warnings are HTML (it underlines the bad character): shown here as plain text.
  const notes = (visual?.warnings ?? []).map((w) => w.replace(/<[^>]*>/g, ""));
  warnings.textContent = notes.length ? `abcjs: ${notes.slice(0, 3).join("; ")}${notes.length > 3 ? " …" : ""}` : "";
  $("#music-form").elements.tempo.placeholder = visual ? `auto (${autoTempo()})` : "auto";
  markWrongBars();
}

/** Character offset of a report's 1-based (line, col) in `abc`. */
function offsetOf(abc, line, col) {
  let offset = 0;
  const lines = abc.split("\n");
  for (let i = 0; i < line - 1 && i < lines.length; i++) offset += lines[i].length + 1;
  return offset + col - 1;
}

/** Colour the notes of each wrong bar: a bar runs from its (line, col) to the next bar's. */
function markWrongBars() {
  if (!visual || !tune.report || tune.reportAbc !== tune.abc) return;
  const bars = tune.report.bar_lengths ?? [];
  const ranges = bars.map((b, i) => ({
    ok: b.ok,
    start: offsetOf(tune.abc, b.line, b.col),
    end: i + 1 < bars.length ? offsetOf(tune.abc, bars[i + 1].line, bars[i + 1].col) : tune.abc.length,
  })).filter((r) => !r.ok);
  if (!ranges.length) return;
  for (const line of visual.lines ?? []) {
    for (const staff of line.staff ?? []) {
      for (const voice of staff.voices ?? []) {
        for (const el of voice) {
          if (el.startChar === undefined || !ranges.some((r) => el.startChar >= r.start && el.startChar < r.end)) continue;
          for (const svg of el.abselem?.elemset ?? []) svg.classList.add("wrong-bar");
        }
      }
    }
  }
}

function setEnabled(on) {
  for (const id of ["#music-play", "#music-down", "#music-up", "#music-continue"]) $(id).disabled = !on;
  for (const b of $$("#tab-music [data-download]")) b.disabled = !on;
}

function setTranspose(steps) {
  transpose = Math.max(-MAX_TRANSPOSE, Math.min(MAX_TRANSPOSE, steps));
  $("#music-transpose").textContent = transpose > 0 ? `+${transpose}` : String(transpose);
  const playing = !$("#music-audio").paused;
  engrave();
  if (playing) guard($("#music-play"), play); // the sound follows: rendered again, transposed
}

// -- the report -----------------------------------------------------------------------------

function showReport() {
  const box = $("#music-report");
  const r = tune.report;
  if (!r) {
    box.replaceChildren(tune.abc.trim()
      ? h("p", { class: "muted small" }, "Press Check to have the server read every bar.") : "");
    return;
  }
  const stale = tune.reportAbc !== tune.abc;
  const wrong = (r.bar_lengths ?? []).filter((b) => !b.ok);
  const children = [
    h("div", { class: `verdict ${r.valid ? "ok" : "bad"}` },
      r.valid ? "✓ valid: every bar scans" : `✗ ${wrong.length === 1 ? "1 bar does" : `${wrong.length} bars do`} not scan`),
    stale ? h("p", { class: "muted small stale" }, "The ABC was edited since: press Check again.") : null,
    h("dl", { class: "facts" },
      ...[["bars", r.bars], ["meter", r.meter], ["key", r.key], ["unit", r.unit], ["pickup", r.pickup],
          ["repeats", r.repeats], ["endings", r.endings?.length ? r.endings.join(" ") : null], ["title", r.title]]
        .filter(([, v]) => v !== null && v !== undefined && v !== "")
        .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))])),
    wrong.length ? h("ul", { class: "wrong-bars" }, wrong.map((b) => h("li", {},
      h("button", { type: "button", class: "link", title: "show it in the ABC", onclick: () => selectAt(b.line, b.col) },
        `bar ${b.number}`),
      ` (line ${b.line}, column ${b.col}) is ${b.status}: ${b.length} units`,
      b.expected !== null ? ` where ${b.expected} are expected` : ""))) : null,
  ];
  box.replaceChildren(...children.filter(Boolean));
}

/** Put the caret at a 1-based (line, col) of the textarea. */
function selectAt(line, col) {
  const box = $("#music-abc");
  const at = offsetOf(box.value, line, col);
  box.focus();
  box.setSelectionRange(at, at + 1);
}

async function check() {
  clearTimeout(editTimer);
  const abc = $("#music-abc").value;
  if (abc !== tune.abc) { // typed since the last engraving
    tune.abc = abc;
    engrave();
  }
  const out = $("#music-check-out");
  out.replaceChildren();
  let report;
  try {
    report = await api("/api/music/check", { json: { abc } });
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 400) throw err;
    // The answer to "is this ABC?" is no: shown by the textarea, with the caret on the place.
    out.replaceChildren(h("div", { class: "check-error", role: "alert" }, h("strong", {}, "✗ "), err.message));
    const at = /line (\d+), column (\d+)/.exec(err.message);
    if (at) selectAt(Number(at[1]), Number(at[2]));
    tune.report = null;
    tune.reportAbc = null;
    showReport();
    return;
  }
  Object.assign(tune, { report, reportAbc: abc });
  engrave();
  showReport();
  out.replaceChildren(h("div", { class: `check-ok ${report.valid ? "ok" : "bad"}` },
    report.valid ? `✓ ABC the server reads: ${report.bars} bars, every one scans`
      : `✗ ${report.wrong_bars.length} bar(s) do not scan: ${report.wrong_bars.join(", ")}`));
}

// -- sound ----------------------------------------------------------------------------------

/**
 * Quarter notes per minute: the form's tempo, or the one abcjs reads from the tune (its Q:, else
 * abcjs's default: 180, a dotted quarter at 120 in 6/8). Sent to the server every time, so that the
 * sound and the highlight keep the same tempo; undefined (the server's default) without a score.
 */
function quartersPerMinute() {
  return num($("#music-form"), "tempo") ?? autoTempo();
}

function autoTempo() {
  // The server's tempo for this tune (its Q:, else the meter's), as its report says, so the tab plays
  // what a download from the gallery plays; else abcjs's, which counts beats of getBeatLength()
  // whole notes (a dotted quarter in 6/8; a quarter is 1/4).
  if (tune.report?.tempo && tune.reportAbc === tune.abc) return tune.report.tempo;
  return visual ? Math.round(visual.getBpm() * visual.getBeatLength() * 4) : undefined;
}

/** The POST /api/music/render body for the tune as shown (transposed, with the form's sound settings). */
function renderBody(format) {
  const form = $("#music-form");
  return compact({
    abc: tune.abc,
    format,
    instrument: form.elements.instrument.value,
    chords: form.elements.chords.checked,
    transpose,
    tempo: quartersPerMinute(),
  });
}

function soundSettingsChanged() {
  if (!$("#music-audio").paused) guard($("#music-play"), play);
}

async function play() {
  if (!tune.abc.trim()) throw new Error("there is no tune to play: generate one or write ABC first");
  stop();
  const audio = $("#music-audio");
  const body = renderBody("wav");
  const key = JSON.stringify(body);
  if (sound.key !== key) {
    $("#music-time").textContent = "rendering…";
    const blob = await (await api("/api/music/render", { json: body, raw: true })).blob();
    if (sound.url) URL.revokeObjectURL(sound.url);
    sound = { key, blob, url: URL.createObjectURL(blob) };
    audio.src = sound.url;
  }
  if (visual && abcjs) {
    // TimingCallbacks' qpm is in abcjs's beats (getBeatLength), not quarters.
    const beats = (body.tempo / 4) / visual.getBeatLength();
    timer = new abcjs.TimingCallbacks(visual, { qpm: beats, eventCallback: onNote });
  }
  audio.currentTime = 0;
  $("#music-stop").disabled = false;
  $("#music-paper").dataset.playing = "true";
  await audio.play();
}

/** Stop the sound and the highlight; the next Play starts from the beginning. */
function stop() {
  const audio = $("#music-audio");
  if (!audio.paused) audio.pause();
  timer?.stop();
  timer = null;
  onNote(null);
  $("#music-stop").disabled = true;
  delete $("#music-paper").dataset.playing;
}

/** TimingCallbacks' event: light the notes sounding now and move the cursor to them (null: the end). */
function onNote(ev) {
  for (const el of lit) el.classList.remove("playing");
  lit = [];
  if (!ev) {
    cursor?.remove();
    cursor = null;
    return;
  }
  for (const group of ev.elements ?? []) {
    for (const el of group) {
      el.classList.add("playing");
      lit.push(el);
    }
  }
  const svg = $("#music-paper svg");
  if (!svg || ev.left === undefined) return;
  if (!cursor || !svg.contains(cursor)) {
    cursor = document.createElementNS("http://www.w3.org/2000/svg", "line");
    cursor.setAttribute("class", "music-cursor");
    svg.append(cursor);
  }
  const x = ev.left - 2;
  cursor.setAttribute("x1", x);
  cursor.setAttribute("x2", x);
  cursor.setAttribute("y1", ev.top);
  cursor.setAttribute("y2", ev.top + ev.height);
}

function clock(seconds) {
  if (!Number.isFinite(seconds)) return "–:––";
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

// -- downloads ------------------------------------------------------------------------------

function fileStem() {
  const title = headerOf(tune.abc).T || tune.report?.title || "";
  const slug = title.normalize("NFKD").replace(/[^\w\s-]/g, "").trim().toLowerCase().replace(/[\s_-]+/g, "-");
  const stem = slug || tune.artifactId || "tune";
  return transpose ? `${stem}${transpose > 0 ? "+" : ""}${transpose}` : stem;
}

/** ABC (transposed by abcjs when the view is), MIDI or WAV (rendered by the server). */
async function save(format) {
  if (format === "abc") {
    let abc = tune.abc;
    if (transpose) {
      if (!abcjs) throw new Error("transposing the ABC text needs abcjs: download it untransposed, or install abcjs");
      abc = abcjs.strTranspose(tune.abc, abcjs.parseOnly(tune.abc), transpose);
    }
    download(new Blob([abc], { type: "text/vnd.abc" }), `${fileStem()}.abc`);
    return;
  }
  const body = renderBody(format);
  const data = format === "wav" && sound.key === JSON.stringify(body) ? sound.blob
    : await (await api("/api/music/render", { json: body, raw: true })).blob();
  download(data, `${fileStem()}.${format}`);
}
