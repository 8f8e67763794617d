// Smart Compose in the chat page's input box: ghost text after the caret from POST /v1/compose
// (serve/compose.py). Tab accepts the suggestion, Esc rejects it; typing on hides it.
//
// Each keystroke reports the box's state: the text before the caret, the last event (type, backspace,
// reject, accept, paste) and the ms since the previous key; the service decides whether to suggest
// (word boundary, minimum prefix, debounce...) and keeps this box's prompt cache under `session_id`.
// Requests go out DEBOUNCE_MS after the last key, and an answer for an older text is dropped. The
// ghost is a mirror of the textarea laid over it: the typed text invisible, the suggestion grey.
"use strict";

(() => {
  const DEBOUNCE_MS = 150;
  const box = document.getElementById("prompt");
  if (!box) return;
  const sessionId = "compose-" + Array.from(crypto.getRandomValues(new Uint8Array(8)),
    (b) => b.toString(16).padStart(2, "0")).join("");
  let lastEvent = "type";
  let lastKeyAt = performance.now();
  let timer = null;
  let suggestion = null;   // {text, forValue}: shown only while the box still holds forValue

  // the mirror: same box model and font as the textarea, on top of it, letting clicks through
  const ghost = document.createElement("div");
  ghost.id = "compose-ghost";
  ghost.setAttribute("aria-hidden", "true");
  const typed = document.createElement("span");
  typed.style.color = "transparent";
  const hint = document.createElement("span");
  hint.className = "compose-suggestion";
  hint.style.color = "#9aa0a6";
  ghost.append(typed, hint);
  document.body.appendChild(ghost);

  function place() {
    const s = getComputedStyle(box);
    const r = box.getBoundingClientRect();
    for (const p of ["fontFamily", "fontSize", "fontWeight", "lineHeight", "letterSpacing", "paddingTop",
                     "paddingRight", "paddingBottom", "paddingLeft", "borderTopWidth", "borderRightWidth",
                     "borderBottomWidth", "borderLeftWidth", "boxSizing", "textIndent", "wordSpacing"]) {
      ghost.style[p] = s[p];
    }
    Object.assign(ghost.style, {
      position: "fixed", left: `${r.left}px`, top: `${r.top}px`, width: `${r.width}px`, height: `${r.height}px`,
      borderStyle: "solid", borderColor: "transparent", whiteSpace: "pre-wrap", overflowWrap: "break-word",
      overflow: "hidden", pointerEvents: "none", zIndex: 10, margin: "0",
    });
    ghost.scrollTop = box.scrollTop;
  }

  function show() {
    const on = suggestion && suggestion.forValue === box.value && box.selectionStart === box.value.length;
    typed.textContent = box.value;
    hint.textContent = on ? suggestion.text : "";
    ghost.dataset.suggestion = on ? suggestion.text : "";
    if (on) place();
    ghost.style.display = on ? "block" : "none";
  }

  async function ask(value, event, idleMs) {
    let body;
    try {
      const r = await fetch("/v1/compose", {
        method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ prefix: value, session_id: sessionId, last_event: event, idle_ms: Math.round(idleMs) }),
      });
      if (!r.ok) return;   // 400 on an empty box, 503 without a compose model: no ghost, nothing to say
      body = await r.json();
    } catch { return; }
    if (box.value !== value || !body.suggestion) return;   // the user typed on meanwhile
    const text = (value.endsWith(" ") || value.endsWith("\n") ? "" : " ") + body.suggestion;
    suggestion = { text, forValue: value };
    show();
  }

  box.addEventListener("input", (e) => {
    const now = performance.now();
    const idle = now - lastKeyAt;
    lastKeyAt = now;
    lastEvent = e.inputType && e.inputType.startsWith("delete") ? "backspace"
      : e.inputType === "insertFromPaste" ? "paste" : "type";
    suggestion = null;
    show();
    clearTimeout(timer);
    const value = box.value;
    const event = lastEvent;
    if (!value.trim() || box.selectionStart !== value.length) return;
    // the request reports the pause the user made before it goes out (the debounce), not the key gap
    timer = setTimeout(() => ask(value, event, Math.max(idle, DEBOUNCE_MS)), DEBOUNCE_MS);
  });

  box.addEventListener("keydown", (e) => {
    if (!suggestion || suggestion.forValue !== box.value) return;
    if (e.key === "Tab") {
      e.preventDefault();
      box.value = suggestion.forValue + suggestion.text;
      box.selectionStart = box.selectionEnd = box.value.length;
      suggestion = null;
      lastEvent = "accept";
      show();
    } else if (e.key === "Escape") {
      e.preventDefault();
      suggestion = null;
      lastEvent = "reject";
      show();
    }
  });

  box.addEventListener("scroll", () => { ghost.scrollTop = box.scrollTop; });
  box.addEventListener("blur", () => { suggestion = null; show(); });
  window.addEventListener("resize", () => { if (ghost.style.display === "block") place(); });
  show();
})();
