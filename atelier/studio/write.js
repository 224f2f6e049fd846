// Write: POST /v1/completions with stream=true; tokens appear as they arrive, Stop aborts.

import { sse } from "./api.js";
import { $, compact, facts, fillModelPicker, guard, h, num } from "./ui.js";

export function init(ctx) {
  const form = $("#write-form");
  const out = $("#write-out");
  const stop = $("#write-stop");
  const state = $("#write-state");
  const usageBox = $("#write-usage");
  let controller = null;

  ctx.on("models", (models) => fillModelPicker(form.elements.model, models, "text-generation"));
  stop.addEventListener("click", () => controller?.abort());

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const body = compact({
      model: form.elements.model.value,
      prompt: form.elements.prompt.value,
      max_tokens: num(form, "max_tokens"),
      temperature: num(form, "temperature"),
      top_p: num(form, "top_p"),
      seed: num(form, "seed"),
      stream: true,
      stream_options: { include_usage: true },
    });
    const generated = h("span", { class: "gen" });
    const started = performance.now();
    let finish = null;
    let usage = null;
    let model = "";
    let chunks = 0;
    controller = new AbortController();
    stop.disabled = false;
    state.textContent = "streaming…";
    state.dataset.state = "streaming";
    usageBox.replaceChildren();

    guard(e.submitter, async () => {
      try {
        for await (const { data } of sse("/v1/completions", body, controller.signal)) {
          if (chunks === 0) out.replaceChildren(h("span", { class: "prompt" }, body.prompt), generated,
                                                h("span", { class: "caret" }));
          chunks += 1;
          model = data.model || model;
          for (const choice of data.choices ?? []) {
            generated.textContent += choice.text;
            finish = choice.finish_reason || finish;
          }
          if (data.usage) usage = data.usage;
        }
        state.textContent = `done (${finish ?? "end"})`;
        state.dataset.state = "done";
      } catch (err) {
        state.textContent = err.name === "AbortError" ? "stopped" : "failed";
        state.dataset.state = err.name === "AbortError" ? "stopped" : "failed";
        throw err;
      } finally {
        stop.disabled = true;
        out.querySelector(".caret")?.remove();
        const seconds = (performance.now() - started) / 1000;
        usageBox.replaceChildren(facts([
          ["model", model],
          ["prompt tokens", usage?.prompt_tokens],
          ["cached prompt tokens", usage?.prompt_tokens_details?.cached_tokens],
          ["completion tokens", usage?.completion_tokens],
          ["total tokens", usage?.total_tokens],
          ["speed", usage ? `${(usage.completion_tokens / seconds).toFixed(1)} tokens/s` : undefined],
          ["seed", body.seed],
        ]));
      }
    });
  });
}

export function show() {}
