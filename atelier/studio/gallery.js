// Gallery: GET /api/artifacts (newest first, paged with `after`), thumbnails fetched with the
// key (/content → blob URL), and an artifact's full provenance, with the A1111 `parameters`
// text read from the PNG itself. Tunes (kind "melody") show their title and ABC, open in the Music
// tab, and download as ABC, MIDI or WAV (/content?format=…).

import { api, blob } from "./api.js";
import { $, badge, download, facts, fmtBytes, fmtTime, guard, h, picture } from "./ui.js";

let ctx;
let urls = []; // blob URLs of the page shown, revoked when it is replaced
let detailUrl = null; // the blob URL of the artifact shown in the detail panel
let cursors = [null]; // `after` of each page seen; the last one is the page shown
let lastPage = null;
let loads = 0; // a newer load supersedes the pages still in flight (filters changed quickly)

export function init(context) {
  ctx = context;
  const filters = $("#gallery-filters");
  filters.addEventListener("submit", (e) => {
    e.preventDefault();
    cursors = [null];
    guard(e.submitter, load);
  });
  for (const el of filters.querySelectorAll("select")) {
    el.addEventListener("change", () => { cursors = [null]; guard(null, load); });
  }
  $("#gallery-older").addEventListener("click", (e) => {
    cursors.push(lastPage.last_id);
    guard(e.currentTarget, load);
  });
  $("#gallery-newer").addEventListener("click", (e) => {
    cursors.pop();
    guard(e.currentTarget, load);
  });
  ctx.on("models", (models) => {
    const select = $("#gallery-model");
    const keep = select.value;
    select.replaceChildren(h("option", { value: "" }, "all"), ...models.map((m) => h("option", { value: m.id }, m.id)));
    select.value = models.some((m) => m.id === keep) ? keep : "";
  });
  ctx.on("show-artifact", (id) => guard(null, () => showDetail(id)));
}

export function show() {
  cursors = [null];
  guard(null, load);
}

async function load() {
  const f = $("#gallery-filters");
  const params = new URLSearchParams({ limit: f.elements.limit.value });
  if (f.elements.kind.value) params.set("kind", f.elements.kind.value);
  if (f.elements.model.value) params.set("model", f.elements.model.value);
  const after = cursors[cursors.length - 1];
  if (after) params.set("after", after);
  const mine = ++loads;
  const page = await api(`/api/artifacts?${params}`);
  if (mine !== loads) return;
  lastPage = page;
  for (const u of urls) URL.revokeObjectURL(u);
  urls = [];
  const grid = $("#gallery-grid");
  grid.replaceChildren(...page.data.map(tile));
  if (!page.data.length) grid.append(h("p", { class: "muted empty" }, "No artifacts match. Generate images in the Images tab."));
  $("#gallery-newer").disabled = cursors.length <= 1;
  $("#gallery-older").disabled = !page.has_more;
  $("#gallery-page").textContent = `page ${cursors.length}`;
}

function tile(a) {
  const body = h("div", { class: "thumb" });
  const el = h("button", { type: "button", class: `tile kind-${a.kind}`, dataset: { id: a.id },
                           onclick: () => guard(null, () => showDetail(a.id)) },
    body, h("span", { class: "tile-caption" }, h("b", {}, a.model), h("span", { class: "muted" }, caption(a))));
  fillThumb(body, a).catch(() => body.append(h("span", { class: "muted" }, "unavailable")));
  return el;
}

function caption(a) {
  const p = a.params || {};
  if (p.seed !== undefined && p.seed !== null) return `seed ${p.seed}`;
  if (p.style) return p.style;
  return a.kind;
}

async function fillThumb(box, a) {
  const data = await blob(a.content_url);
  if (a.mime.startsWith("image/")) {
    const url = URL.createObjectURL(data);
    urls.push(url);
    box.append(picture(url, a.params?.prompt ?? a.kind));
  } else if (a.kind === "melody") { // a tune: its title and header instead of a picture
    const abc = await data.text();
    const field = (name) => new RegExp(`^${name}:(.*)$`, "m").exec(abc)?.[1].trim();
    box.classList.add("tune-thumb");
    box.append(h("span", { class: "tune-clef" }, "♫"), h("b", {}, field("T") || "untitled"),
               h("span", { class: "muted" }, [field("M"), field("K") && `K:${field("K")}`].filter(Boolean).join(" · ")));
  } else {
    const t = await data.text();
    box.classList.add("text-thumb");
    box.append(h("p", {}, t.length > 140 ? `${t.slice(0, 140)}…` : t));
  }
}

// -- provenance ---------------------------------------------------------------------------

async function showDetail(id) {
  const a = await api(`/api/artifacts/${encodeURIComponent(id)}`);
  const data = await blob(a.content_url);
  const panel = $("#gallery-detail");
  for (const t of document.querySelectorAll(".tile")) t.classList.toggle("selected", t.dataset.id === id);
  let preview;
  let parameters = null;
  if (detailUrl) URL.revokeObjectURL(detailUrl);
  detailUrl = null;
  if (a.mime.startsWith("image/")) {
    detailUrl = URL.createObjectURL(data);
    preview = picture(detailUrl, a.params?.prompt ?? a.kind, "big");
    if (a.mime === "image/png") parameters = (await pngText(await data.arrayBuffer())).parameters ?? null;
  } else {
    preview = h("pre", { class: a.kind === "melody" ? "abc-text" : "poem-text" }, await data.text());
  }
  const p = a.params || {};
  const tune = a.kind === "melody" ? preview.textContent : null;
  const canRerun = a.kind === "image" && typeof p.prompt === "string" && p.sampler !== undefined;
  panel.hidden = false;
  panel.dataset.id = a.id;
  panel.replaceChildren(
    h("header", { class: "detail-head" }, h("h2", {}, "Provenance"), badge(a.kind),
      h("button", { type: "button", class: "banner-close", title: "close", onclick: () => { panel.hidden = true; } }, "×")),
    preview,
    facts([
      ["id", a.id], ["model", a.model], ["seed", p.seed], ["created", fmtTime(a.created)], ["key", a.key_id],
      ["sha256", h("code", { class: "hash" }, a.sha256)], ["size", `${fmtBytes(a.size)} · ${a.mime}`],
    ]),
    h("h3", {}, "Parameters"),
    facts(Object.entries(p).filter(([k]) => k !== "seed").map(([k, v]) =>
      [k, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)])),
    ...(parameters !== null ? [h("h3", {}, "A1111 parameters (PNG info)"), h("pre", { class: "a1111" }, parameters)] : []),
    h("div", { class: "actions" },
      canRerun ? h("button", { type: "button", class: "primary send-to-images",
                               onclick: () => { ctx.emit("send-to-images", { ...p, model: a.model });
                                                ctx.openTab("images"); } }, "Send to Images") : null,
      parameters !== null ? h("button", { type: "button", onclick: () => navigator.clipboard?.writeText(parameters) },
                              "Copy parameters") : null,
      tune !== null ? tuneButtons(a, tune)
        : h("button", { type: "button", onclick: () => download(data, `${a.id}${a.mime === "image/png" ? ".png" : ".txt"}`) },
          "Download")));
}

/** A tune's buttons: open it in the Music tab; its ABC, and its MIDI and WAV rendered by the server. */
function tuneButtons(a, abc) {
  const rendered = (format, label) => h("button", { type: "button", dataset: { format },
    onclick: (e) => guard(e.currentTarget, async () => download(
      await blob(`/api/artifacts/${encodeURIComponent(a.id)}/content?format=${format}`), `${a.id}.${format}`)) }, label);
  return [
    h("button", { type: "button", class: "primary open-in-music",
                  onclick: () => ctx.emit("open-tune", { abc, model: a.model, seed: a.params?.seed ?? null, artifactId: a.id }) },
      "Open in Music"),
    rendered("abc", "ABC"), rendered("mid", "MIDI"), rendered("wav", "WAV"),
  ];
}

/** The text chunks (tEXt, iTXt, zTXt) of a PNG: {keyword: text}. */
export async function pngText(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const inflate = async (data) => new Uint8Array(
    await new Response(new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate"))).arrayBuffer());
  const out = {};
  for (let p = 8; p + 12 <= bytes.length;) {
    const length = view.getUint32(p);
    const type = latin1.decode(bytes.subarray(p + 4, p + 8));
    const data = bytes.subarray(p + 8, p + 8 + length);
    const zero = data.indexOf(0);
    if (type === "tEXt") {
      out[latin1.decode(data.subarray(0, zero))] = latin1.decode(data.subarray(zero + 1));
    } else if (type === "zTXt") {
      out[latin1.decode(data.subarray(0, zero))] = latin1.decode(await inflate(data.subarray(zero + 2)));
    } else if (type === "iTXt") {
      // keyword \0 compressed method language \0 translated keyword \0 text
      const compressed = data[zero + 1] === 1;
      const lang = data.indexOf(0, zero + 3);
      const translated = data.indexOf(0, lang + 1);
      const rest = data.subarray(translated + 1);
      out[latin1.decode(data.subarray(0, zero))] = utf8.decode(compressed ? await inflate(rest) : rest);
    } else if (type === "IEND") {
      break;
    }
    p += 12 + length;
  }
  return out;
}
