// Documents mode of the chat page (ChatPDF, serve/rag.py): questions go to POST /v1/rag/query and the
// answer shows sentence by sentence, each with the citation [document, p. N] of the passage that
// supports it; a sentence the retrieved passages do not hold is flagged "unsupported", one resting on a
// poorly scanned page "low OCR confidence". The retrieved passages open under the answer. PDFs are
// uploaded with POST /v1/rag/documents (a refusal shows its quarantine reason), listed with
// GET /v1/rag/documents and deleted with DELETE /v1/rag/documents/{id}.
//
// The mode switch "Assistant | Documents" lives here too; chat.js leaves the composer to this file in
// Documents mode. The questions and answers of Documents mode are kept in localStorage (last MAX_TURNS).
"use strict";

(() => {
  const MODE_KEY = "forgeline.mode";
  const TURNS_KEY = "forgeline.rag.turns";
  const MAX_TURNS = 20;
  const ragLog = document.getElementById("rag-log");
  const form = document.getElementById("composer");
  const input = document.getElementById("prompt");
  const sendButton = document.getElementById("send");
  const uploadForm = document.getElementById("upload");
  const fileInput = document.getElementById("pdf");
  const uploadStatus = document.getElementById("upload-status");
  const docList = document.getElementById("doc-list");
  const placeholders = { assistant: input.placeholder,
                         documents: "Ask a question about the documents (Enter sends)" };
  let turns = load();   // [{question, result} | {question, error}]

  function load() {
    try { return JSON.parse(localStorage.getItem(TURNS_KEY)) || []; } catch { return []; }
  }

  function save() {
    turns = turns.slice(-MAX_TURNS);
    localStorage.setItem(TURNS_KEY, JSON.stringify(turns));
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const fileName = (path) => path.split("/").pop();
  const citationText = (c) => `[${fileName(c.document)}, p. ${c.page}]`;

  async function errorText(res) {
    try {
      const body = await res.json();
      const d = body.detail !== undefined ? body.detail : body.error;
      if (d && typeof d === "object" && d.reason) return `${d.quarantined ? "quarantined: " : ""}${d.reason}` + (d.detail ? ` (${d.detail})` : "");
      if (d && typeof d === "object" && d.message) return d.message;
      if (Array.isArray(d)) return d.map((x) => x.msg || JSON.stringify(x)).join("; ");
      return typeof d === "string" ? d : JSON.stringify(body);
    } catch {
      return `HTTP ${res.status}`;
    }
  }

  // ---------------------------------------------------------------------------- the mode switch

  function setMode(mode) {
    document.body.dataset.mode = mode;
    localStorage.setItem(MODE_KEY, mode);
    for (const b of document.querySelectorAll("#modes [data-mode]")) {
      b.setAttribute("aria-selected", String(b.dataset.mode === mode));
    }
    for (const e of document.querySelectorAll(".assistant-only")) e.hidden = mode !== "assistant";
    for (const e of document.querySelectorAll(".documents-only")) e.hidden = mode !== "documents";
    input.placeholder = placeholders[mode];
    if (mode === "documents") listDocuments();
  }

  // ---------------------------------------------------------------------------- an answer

  // one answer (extractive or generated): its sentences, each with its citation and flags
  function answerBlock(kind, title, ans, turnNo) {
    const box = el("div", `answer ${kind}`);
    box.appendChild(el("h3", "", title));
    const p = el("p", "sentences");
    if (ans.leak_blocked) p.appendChild(el("span", "flag blocked", "withheld: the reply repeated the system prompt"));
    if (!ans.sentences.length && !ans.leak_blocked) p.appendChild(el("span", "muted", "(nothing to say from these passages)"));
    for (const s of ans.sentences) {
      const span = el("span", "sentence");
      span.appendChild(el("span", "sentence-text", s.sentence));
      if (s.citation) {
        const a = el("a", "citation", citationText(s.citation));
        a.href = `#passage-${turnNo}-${s.rank}`;
        a.title = `passage ${s.rank}: ${s.citation.document}, page ${s.citation.page}`;
        a.onclick = (e) => { e.preventDefault(); showPassage(span.closest(".turn"), s.rank); };
        span.append(" ", a);
      }
      if (s.supported === false) {
        span.classList.add("unsupported");
        span.append(" ", el("span", "flag unsupported", "unsupported"));
        span.title = "no retrieved passage holds this sentence's words: check it";
      }
      if (s.low_ocr_confidence) {   // the passage it cites comes from a poorly scanned page
        span.classList.add("low-ocr");
        span.append(" ", el("span", "flag low-ocr", "low OCR confidence"));
      }
      p.append(span, " ");
    }
    box.appendChild(p);
    const f = ans.faithfulness;
    if (f) {
      const n = f.unsupported.length;
      box.appendChild(el("div", "faithfulness muted", `faithfulness ${f.score.toFixed(2)} (${f.checked - n} of ${f.checked} `
        + `sentences supported${n ? `; ${n} unsupported` : ""})`));
    }
    return box;
  }

  function showPassage(turn, rank) {
    const details = turn.querySelector("details.passages");
    details.open = true;
    const li = turn.querySelector(`.passage[data-rank="${rank}"]`);
    for (const x of turn.querySelectorAll(".passage.highlight")) x.classList.remove("highlight");
    li.classList.add("highlight");
    li.scrollIntoView({ block: "nearest" });
  }

  function passages(retrieved, turnNo) {
    const details = el("details", "passages");
    details.appendChild(el("summary", "", `${retrieved.length} passage${retrieved.length === 1 ? "" : "s"} retrieved`));
    const ol = el("ol");
    for (const h of retrieved) {
      const li = el("li", "passage");
      li.id = `passage-${turnNo}-${h.rank}`;
      li.dataset.rank = h.rank;
      const meta = el("div", "meta");
      const pages = h.page_end > h.page ? `pp. ${h.page}-${h.page_end}` : `p. ${h.page}`;
      meta.append(el("span", "where", `${fileName(h.document)}, ${pages}`), " ", el("span", "muted", `cosine ${h.score.toFixed(3)}`));
      if (h.low_ocr_confidence) meta.append(" ", el("span", "flag low-ocr", "low OCR confidence"));
      if (h.instruction_like) meta.append(" ", el("span", "flag injection", "reads like an instruction: treated as data"));
      li.append(meta, el("blockquote", "", h.text.replace(/\f/g, "\n")));
      ol.appendChild(li);
    }
    details.appendChild(ol);
    return details;
  }

  function renderTurn(t, turnNo) {
    const user = el("div", "turn user");
    user.appendChild(el("span", "text", t.question));
    const div = el("div", "turn rag");
    if (t.error) {
      div.classList.add("error");
      div.appendChild(el("span", "text", `No answer: ${t.error}`));
    } else if (t.result.refused) {
      div.classList.add("refused");
      div.appendChild(el("span", "text", `Not answered (${t.result.category}): ${t.result.reason}.`));
    } else {
      renderResult(div, t.result, turnNo);
    }
    ragLog.append(user, div);
    div.scrollIntoView({ block: "end" });
    return div;
  }

  function renderResult(div, r, turnNo) {
    if (r.generated) div.appendChild(answerBlock("generated", "Answer (generated)", r.generated, turnNo));
    div.appendChild(answerBlock("extractive", r.generated ? "From the documents (quoted)" : "Answer (quoted from the documents)",
                                r.extractive, turnNo));
    if (r.low_ocr_confidence) {
      div.appendChild(el("div", "notice low-ocr", "Some passages come from a poorly scanned page (low OCR confidence): "
        + "check them against the document."));
    }
    div.appendChild(passages(r.retrieved, turnNo));
  }

  function render() {
    ragLog.replaceChildren();
    turns.forEach(renderTurn);
  }

  async function ask(question) {
    const user = el("div", "turn user");
    user.appendChild(el("span", "text", question));
    const pending = el("div", "turn rag pending", "Searching the documents…");
    ragLog.append(user, pending);
    pending.scrollIntoView({ block: "end" });
    let turn;
    try {
      const res = await fetch("/v1/rag/query", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ question }),
      });
      if (!res.ok) throw new Error(await errorText(res));
      turn = { question, result: await res.json() };
    } catch (e) {
      turn = { question, error: e.message };
    }
    user.remove();
    pending.remove();
    turns.push(turn);
    save();
    renderTurn(turn, turns.length - 1);
  }

  // ---------------------------------------------------------------------------- documents

  async function listDocuments() {
    let docs;
    try {
      const res = await fetch("/v1/rag/documents");
      if (!res.ok) throw new Error(await errorText(res));
      docs = (await res.json()).documents;
    } catch (e) {
      docList.replaceChildren(el("li", "error", `No document list: ${e.message}`));
      return;
    }
    docs.sort((a, b) => a.source.localeCompare(b.source));
    document.getElementById("doc-count").textContent = docs.length;
    docList.replaceChildren(...docs.map((d) => {
      const li = el("li", "document");
      li.dataset.docId = d.doc_id;
      li.append(el("span", "source", d.source), " ",
                el("span", "muted", `${d.pages} page${d.pages === 1 ? "" : "s"}, ${d.chunks} chunk${d.chunks === 1 ? "" : "s"}`));
      if (d.low_ocr_confidence) li.append(" ", el("span", "flag low-ocr", "low OCR confidence"));
      const del = el("button", "delete", "Delete");
      del.type = "button";
      del.title = `remove ${d.source} and its chunks from the index`;
      del.onclick = async () => {
        del.disabled = true;
        const res = await fetch(`/v1/rag/documents/${encodeURIComponent(d.doc_id)}`, { method: "DELETE" });
        uploadStatus.textContent = res.ok ? `Deleted ${d.source}.` : `Not deleted: ${await errorText(res)}`;
        listDocuments();
      };
      li.append(" ", del);
      return li;
    }));
  }

  async function upload(file) {
    // the service takes plain names (letters, digits, . _ - and spaces) ending in .pdf
    let name = file.name.replace(/[^A-Za-z0-9._ -]/g, "_").replace(/^[^A-Za-z0-9]+/, "");
    if (!/\.pdf$/i.test(name)) name += ".pdf";
    uploadStatus.textContent = `Uploading ${name}…`;
    uploadStatus.className = "muted";
    const res = await fetch(`/v1/rag/documents?name=${encodeURIComponent(name)}`, {
      method: "POST", headers: { "Content-Type": "application/pdf" }, body: file,
    });
    if (!res.ok) {
      uploadStatus.className = "refusal";
      uploadStatus.textContent = `${name} refused: ${await errorText(res)}`;
      return;
    }
    const d = await res.json();
    const low = (d.low_ocr_pages || []).map((p) => p.page);
    uploadStatus.className = "muted";
    uploadStatus.textContent = `Added ${d.source}: ${d.pages} page${d.pages === 1 ? "" : "s"}, ${d.chunks} chunk${d.chunks === 1 ? "" : "s"}`
      + (d.ocr_pages ? `, ${d.ocr_pages} OCR'd` : "") + (low.length ? `; low OCR confidence on p. ${low.join(", ")}` : "")
      + (d.restored ? " (restored)" : "") + ".";
    fileInput.value = "";
    listDocuments();
  }

  // ---------------------------------------------------------------------------- wiring

  for (const b of document.querySelectorAll("#modes [data-mode]")) b.onclick = () => setMode(b.dataset.mode);

  form.addEventListener("submit", async (event) => {
    if (document.body.dataset.mode !== "documents") return;   // chat.js has it
    event.preventDefault();
    const text = input.value.trim();
    if (!text || sendButton.disabled) return;
    input.value = "";
    sendButton.disabled = true;
    try { await ask(text); } finally { sendButton.disabled = false; input.focus(); }
  });

  uploadForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!fileInput.files.length) { uploadStatus.textContent = "Choose a PDF first."; return; }
    const button = document.getElementById("upload-button");
    button.disabled = true;
    try { await upload(fileInput.files[0]); } catch (e) { uploadStatus.textContent = `Upload failed: ${e.message}`; }
    finally { button.disabled = false; }
  });

  document.getElementById("new-chat").addEventListener("click", () => {
    if (document.body.dataset.mode !== "documents") return;
    turns = [];
    save();
    render();
  });

  render();
  setMode(localStorage.getItem(MODE_KEY) === "documents" ? "documents" : "assistant");
})();
