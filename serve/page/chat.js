// The web chat page (serve/page.py serves it at /): a conversation with streamed replies from
// POST /v1/chat/completions (stream: true, read as server-sent events), a session kept across reloads,
// and on each reply thumbs up/down and an optional better answer, stored by POST /v1/feedback.
//
// Sessions: the service keeps each session's history (serve/llm/sessions.py), so a request carries the
// session id (`session_id`, and `user`) and only the new user turn. The page keeps the id and the turns
// in localStorage to show them after a reload. The reply's trace says how many exchanges the service
// holds for the session; fewer than the page shows means it forgot them (restart, expiry): the page
// marks the break with a note, and what the model saw (the turns after the last note) is what a
// feedback record stores as the prompt.
"use strict";

const SESSION_KEY = "forgeline.session";
const log = document.getElementById("log");
const form = document.getElementById("composer");
const input = document.getElementById("prompt");
const sendButton = document.getElementById("send");
let model = "forgeline-llm";
let session = localStorage.getItem(SESSION_KEY) || newSession();
let turns = loadTurns();   // [{role: user|assistant|note, content, id?, model?, version?, rating?, better?}]

function newSession() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  const id = "sess-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  localStorage.setItem(SESSION_KEY, id);
  return id;
}

function loadTurns() {
  try { return JSON.parse(localStorage.getItem(`forgeline.turns.${session}`)) || []; } catch { return []; }
}

function saveTurns() {
  localStorage.setItem(`forgeline.turns.${session}`, JSON.stringify(turns));
}

// ---------------------------------------------------------------------------- rendering

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  log.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function render() {
  log.replaceChildren();
  document.getElementById("session").textContent = session;
  turns.forEach((turn, i) => {
    const div = bubble(turn.role, turn.content);
    if (turn.role === "assistant" && turn.id) feedbackControls(div, i);
  });
}

// thumbs up/down and a better answer under reply `i`; every change stores the reply's whole state
function feedbackControls(div, i) {
  const turn = turns[i];
  const box = document.createElement("div");
  box.className = "feedback";
  const up = button("▲ Good", "rate-up", "thumbs up: a good reply");
  const down = button("▼ Bad", "rate-down", "thumbs down: a bad reply");
  const open = button("Better answer…", "open-better", "write the answer you wanted");
  const better = document.createElement("div");
  better.className = "better";
  const text = document.createElement("textarea");
  text.className = "better-text";
  text.rows = 2;
  text.placeholder = "The answer you would have wanted";
  text.value = turn.better || "";
  const save = button("Save", "save-better", "store this better answer (it rates the reply down)");
  const status = document.createElement("span");
  status.className = "status muted";
  better.append(text, save);
  box.append(up, down, open, status, better);
  div.appendChild(box);

  const show = () => {
    up.setAttribute("aria-pressed", String(turn.rating === "up"));
    down.setAttribute("aria-pressed", String(turn.rating === "down"));
  };
  const store = async () => {
    status.textContent = "saving…";
    try {
      await sendFeedback(i);
      status.textContent = "saved";
    } catch (e) {
      status.textContent = `not saved: ${e.message}`;
    }
  };
  up.onclick = () => { turn.rating = turn.rating === "up" ? null : "up"; show(); saveTurns(); store(); };
  down.onclick = () => { turn.rating = turn.rating === "down" ? null : "down"; show(); saveTurns(); store(); };
  open.onclick = () => { box.classList.toggle("open"); text.focus(); };
  save.onclick = () => {
    turn.better = text.value.trim() || null;
    if (turn.better) turn.rating = "down";   // a better answer says this one was not good enough
    show(); saveTurns(); store();
  };
  show();
}

function button(label, cls, title) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.title = title;
  return b;
}

// ---------------------------------------------------------------------------- the service

// the turns the model saw before turn `upto`: those after the last note
function history(upto) {
  let start = 0;
  turns.slice(0, upto).forEach((t, i) => { if (t.role === "note") start = i + 1; });
  return turns.slice(start, upto).map((t) => ({ role: t.role, content: t.content }));
}

async function sendFeedback(i) {
  const turn = turns[i];
  const res = await fetch("/v1/feedback", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ id: turn.id, session, messages: history(i), reply: turn.content, rating: turn.rating || null,
                           better: turn.better || null, model: turn.model || model, model_version: turn.version || "" }),
  });
  if (!res.ok) throw new Error(await errorText(res));
}

async function errorText(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return `HTTP ${res.status}`;
  }
}

// Server-sent events of a streamed completion: "data: {chunk}" blocks separated by a blank line,
// ending with "data: [DONE]". Calls onChunk(parsed chunk) for each.
async function readEvents(res, onChunk) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the service reported an error");
      onChunk(chunk);
    }
    if (done) return;
  }
}

async function ask(text) {
  const held = history(turns.length).filter((t) => t.role === "assistant").length;   // exchanges the service should hold
  turns.push({ role: "user", content: text });
  saveTurns();
  bubble("user", text);
  const reply = { role: "assistant", content: "" };
  const div = bubble("assistant", "");
  const span = div.querySelector(".text");
  span.classList.add("streaming");
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: [{ role: "user", content: text }], stream: true, session_id: session,
                             user: session, trace: true }),
    });
    if (!res.ok) throw new Error(await errorText(res));
    await readEvents(res, (chunk) => {
      reply.id = reply.id || chunk.id;
      reply.model = chunk.model || reply.model;
      reply.version = (chunk.forgeline && chunk.forgeline.model_version) || chunk.system_fingerprint || reply.version;
      const step = chunk.forgeline && (chunk.forgeline.trace || []).find((s) => s.step === "session" && "turns" in s);
      if (step) reply.forgotten = step.turns < held;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply.content += delta.content;
        span.textContent = reply.content;
        div.scrollIntoView({ block: "end" });
      }
    });
  } catch (e) {
    div.remove();
    turns.pop();   // the question goes back to the input box: nothing half-answered stays in history
    saveTurns();
    log.lastElementChild && log.lastElementChild.remove();
    input.value = text;
    bubble("error", `No reply: ${e.message}`);
    return;
  } finally {
    span.classList.remove("streaming");
  }
  if (reply.forgotten) {   // the service answered this turn alone: the earlier turns were not its context
    delete reply.forgotten;
    turns.splice(turns.length - 1, 0, { role: "note", content: "The service no longer held the turns above "
      + "(restarted, or the session expired): it answered from here on." });
    turns.push(reply);
    saveTurns();
    render();
    return;
  }
  turns.push(reply);
  saveTurns();
  feedbackControls(div, turns.length - 1);
}

// ---------------------------------------------------------------------------- wiring

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (document.body.dataset.mode === "documents") return;   // rag.js answers from the documents
  const text = input.value.trim();
  if (!text || sendButton.disabled) return;
  input.value = "";
  sendButton.disabled = true;
  try { await ask(text); } finally { sendButton.disabled = false; input.focus(); }
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

document.getElementById("new-chat").addEventListener("click", () => {
  if (document.body.dataset.mode === "documents") return;   // rag.js clears its own log
  localStorage.removeItem(`forgeline.turns.${session}`);
  session = newSession();
  turns = [];
  render();
});

fetch("/v1/models").then((r) => (r.ok ? r.json() : null)).then((body) => {
  if (body && body.data && body.data.length) model = body.data[0].id;
  document.getElementById("model").textContent = model;
}).catch(() => { document.getElementById("model").textContent = model; });

render();
