// The Images section of the chat page: a prompt, a model (gan | vq | t2i), n and an optional seed go to
// POST /v1/images/generations (serve/images.py, OpenAI's images API, b64_json PNGs); the images come
// back into a grid, each with its seed (send it again to get the same image). An error shows the
// service's message (OpenAI's error object: e.g. a model not trained yet names the stage to run).
"use strict";

(() => {
  const form = document.getElementById("image-form");
  if (!form) return;
  const button = document.getElementById("image-generate");
  const status = document.getElementById("image-status");
  const grid = document.getElementById("image-grid");

  function say(text, refusal) {
    status.textContent = text;
    status.classList.toggle("refusal", Boolean(refusal));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const model = document.getElementById("image-model").value;
    const body = { prompt: document.getElementById("image-prompt").value, model,
                   n: Number(document.getElementById("image-n").value) || 1, response_format: "b64_json" };
    const seed = document.getElementById("image-seed").value;
    if (seed !== "") body.seed = Number(seed);
    button.disabled = true;
    say(`generating ${body.n} with ${model}…`);
    let r, answer;
    try {
      r = await fetch("/v1/images/generations", {
        method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      answer = await r.json();
    } catch (e) {
      say(`the request failed: ${e}`, true);
      button.disabled = false;
      return;
    }
    button.disabled = false;
    if (!r.ok) {
      say(`${r.status}: ${(answer.error && answer.error.message) || r.statusText}`, true);
      return;
    }
    grid.replaceChildren(...answer.data.map((item, i) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${item.b64_json}`;
      img.alt = `${answer.model} image ${i + 1}` + (item.revised_prompt ? `: ${item.revised_prompt}` : "");
      const cap = document.createElement("figcaption");
      cap.textContent = `seed ${item.seed}` + (item.revised_prompt ? ` · ${item.revised_prompt}` : "");
      fig.append(img, cap);
      return fig;
    }));
    const info = answer.forgeline || {};
    say(`${answer.data.length} image${answer.data.length === 1 ? "" : "s"} from ${answer.model}, ${answer.size}, ` +
        `in ${info.generate_ms} ms` + (info.conditioned ? "" : " (unconditional: the prompt is not used)"));
  });
})();
