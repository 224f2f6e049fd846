// Small DOM helpers shared by the tabs: element builder, error banners, form values, formats.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** h("div", {class: "card", onclick: fn}, "text", child, [more]) → an element. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

// -- errors: one dismissable banner per failure, never silent ----------------------------

const MAX_BANNERS = 4;

export function showError(err) {
  const box = $("#banners");
  const details = [];
  if (err.param) details.push(`param: ${err.param}`);
  if (err.code) details.push(`code: ${err.code}`);
  if (err.status) details.push(`HTTP ${err.status}`);
  const message = err.message || String(err);
  const same = [...box.children].find((b) => b.dataset.message === message);
  if (same) { // the same failure again (e.g. a refresh that keeps failing): count it, don't stack it
    same.dataset.count = Number(same.dataset.count) + 1;
    same.querySelector(".banner-count").textContent = `×${same.dataset.count}`;
    return;
  }
  const banner = h("div", { class: "banner", role: "alert", dataset: { message, count: 1 } },
    h("span", { class: "banner-icon" }, "⚠"),
    h("div", { class: "banner-text" },
      h("strong", { class: "banner-message" }, message),
      details.length ? h("span", { class: "banner-details" }, details.join(" · ")) : null),
    h("span", { class: "banner-count" }),
    h("button", { type: "button", class: "banner-close", title: "dismiss", "aria-label": "dismiss",
                  onclick: () => banner.remove() }, "×"));
  box.prepend(banner);
  while (box.children.length > MAX_BANNERS) box.lastElementChild.remove();
  if (!(err instanceof Error) || err.name !== "ApiError") console.error(err);
}

export function clearErrors() {
  $("#banners").replaceChildren();
}

/** Run `fn`, show any error in a banner, and mark `button` busy meanwhile. */
export async function guard(button, fn) {
  if (button) button.disabled = true;
  button?.classList.add("busy");
  try {
    return await fn();
  } catch (err) {
    if (err.name !== "AbortError") showError(err);
    return undefined;
  } finally {
    if (button) button.disabled = false;
    button?.classList.remove("busy");
  }
}

// -- forms ------------------------------------------------------------------------------

/** A form field's value: a trimmed string, or undefined when blank. */
export function text(form, name) {
  const v = form.elements[name].value.trim();
  return v === "" ? undefined : v;
}

/** A number field's value, or undefined when blank. */
export function num(form, name) {
  const v = form.elements[name].value.trim();
  return v === "" ? undefined : Number(v);
}

/** The object without its undefined fields (so the server's defaults apply). */
export function compact(obj) {
  return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== undefined));
}

/** Fill a <select> with model ids (and name:alias for aliases other than latest), keeping the choice. */
export function fillModelPicker(select, models, task) {
  const keep = select.value;
  const options = [];
  for (const m of models.filter((m) => m.task === task)) {
    options.push(h("option", { value: m.id }, m.id));
    for (const alias of Object.keys(m.aliases || {})) {
      if (alias !== "latest" && alias !== "production") {
        options.push(h("option", { value: `${m.id}:${alias}` }, `${m.id}:${alias}`));
      }
    }
  }
  if (!options.length) options.push(h("option", { value: "" }, `no ${task} model`));
  select.replaceChildren(...options);
  if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
}

/** Make sure `value` is an option of `select` (e.g. an exact name@version), then pick it. */
export function pickOption(select, value) {
  if (![...select.options].some((o) => o.value === value)) select.append(h("option", { value }, value));
  select.value = value;
}

// -- formats ----------------------------------------------------------------------------

export function fmtTime(seconds) {
  if (!seconds) return "—";
  return new Date(seconds * 1000).toLocaleString("sv-SE"); // 2026-05-01 14:03:59, local time
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function fmtNum(x) {
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  return Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(4);
}

/** A <dl> of label → value pairs (values may be elements). */
export function facts(pairs) {
  return h("dl", { class: "facts" },
    pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").flatMap(([k, v]) => [h("dt", {}, k),
                                                                                            h("dd", {}, v)]));
}

export function badge(textContent, kind = "") {
  return h("span", { class: `badge ${kind}` }, textContent);
}

/** Save a Blob under `filename` through a temporary link. */
export function download(blobValue, filename) {
  const url = URL.createObjectURL(blobValue);
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** An <img> that is drawn with crisp pixels when it is small (32×32 emoji), smooth otherwise. */
export function picture(src, alt, className = "") {
  const img = h("img", { src, alt, class: className });
  img.addEventListener("load", () => img.classList.toggle("pixel", img.naturalWidth <= 128), { once: true });
  return img;
}

export function b64ToBlob(b64, type = "image/png") {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type });
}
