"""The web chat page in a real browser (Debian's Chromium, headless, through Playwright): the whole app
(`serve.app:create_app` under uvicorn on 127.0.0.1) serving a tiny random model made here, with its
guard; type, send, watch the reply stream in, rate it with a better answer, and find the record in
the feedback store; reload: the session and the conversation are still there; a second turn goes to
the service with the session id and only the new turn; a session the service no longer holds shows a
note and the record stores what the model saw.

The screenshot goes to $FORGELINE_TEST_ARTIFACTS (default .forgeline/test-artifacts/) as chat-page.png.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forgeline.feedback import latest, read_records
from forgeline.safety import Guard
from tests.test_serve_llm import start_server, stop_server, tiny_folder
from tests.test_ui import ARTIFACTS, CHROMIUM, browser  # noqa: F401 (browser: the fixture)

pytestmark = pytest.mark.slow   # a browser and a server: end to end

# every text change of a reply bubble, seen from inside the page: a streamed reply changes several times
WATCH_REPLIES = """
window.__replyStates = [];
new MutationObserver((changes) => {
  for (const c of changes) {
    const el = c.target.nodeType === 3 ? c.target.parentElement : c.target;
    const bubble = el && el.closest && el.closest('.turn.assistant');
    if (bubble) window.__replyStates.push(bubble.querySelector('.text').textContent);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/install.sh does)")
    tmp = tmp_path_factory.mktemp("page")
    model = tiny_folder(tmp / "llm")
    # the safety stage's folder format, its classifier flagging nothing: the guard's rules decide
    Guard.save(tmp / "guard", {"threshold_input": 0.5, "threshold_output": 0.5, "categories": ["violence_weapons"],
                               "max_tokens": 64, "embedder": {"int8": False}},
               {"w1": np.zeros((384, 1)), "b1": np.full(1, -30.0), "centroids": np.zeros((1, 384))})
    store = tmp / "feedback"
    proc, url = start_server({"FORGELINE_LLM_MODEL": str(model), "FORGELINE_LLM_GUARD": str(tmp / "guard"),
                              "FORGELINE_FEEDBACK_DIR": str(store)}, tmp,
                             {"max_tokens": 40, "stream_check_tokens": 4, "temperature": 1.0})
    yield url, store, model
    out = stop_server(proc)
    assert "Traceback" not in out, out


@pytest.fixture
def page(browser):
    """A page of test_ui's headless Chromium that records every state of the reply bubbles."""
    page = browser.new_page()
    page.add_init_script(WATCH_REPLIES)
    return page


def send(page, text: str) -> dict:
    """Type `text`, press Enter; return the chat request's body once its reply has finished streaming."""
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
        page.locator("#prompt").fill(text)
        page.locator("#prompt").press("Enter")
    page.locator(".turn.assistant .text.streaming").wait_for(state="detached")
    page.locator("#send:not([disabled])").wait_for()
    return req.value.post_data_json


def test_chat_stream_rate_and_reload(server, page):
    url, store, model = server
    page.goto(url, wait_until="networkidle")
    session = page.locator("#session").text_content()
    assert session.startswith("sess-") and page.locator("#model").text_content() == "forgeline-llm"

    # ---- type, send, see the streamed answer
    body = send(page, "hello there, how are you?")
    assert body["stream"] is True and body["session_id"] == session
    assert body["messages"] == [{"role": "user", "content": "hello there, how are you?"}]
    reply = page.locator(".turn.assistant .text").last.text_content()
    states = [s for s in dict.fromkeys(page.evaluate("window.__replyStates")) if s]
    assert reply and states[-1] == reply
    assert len(states) >= 2 and all(reply.startswith(s) for s in states), states   # it grew piece by piece

    # ---- rate it: thumbs down and a better answer
    bubble = page.locator(".turn.assistant").last
    bubble.locator(".rate-down").click()
    bubble.locator(".status", has_text="saved").wait_for()
    bubble.locator(".open-better").click()
    bubble.locator(".better-text").fill("I am well, thank you. How can I help?")
    bubble.locator(".save-better").click()
    page.wait_for_function("document.querySelector('.turn.assistant .status').textContent === 'saved'")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)

    # ---- the stored record: the reply's last state
    records = read_records(store)
    assert len(records) == 2   # the thumb, then the better answer
    (rec,) = latest(records)
    assert rec["id"].startswith("chatcmpl-") and rec["session"] == session and rec["reply"] == reply
    assert rec["messages"] == [{"role": "user", "content": "hello there, how are you?"}]
    assert rec["rating"] == "down" and rec["better"] == "I am well, thank you. How can I help?"
    assert rec["model"] == "forgeline-llm" and rec["model_version"] == str(model)

    # ---- reload: the same session, the conversation and its rating are still there
    page.reload(wait_until="networkidle")
    assert page.locator("#session").text_content() == session
    assert page.locator(".turn.assistant .text").last.text_content() == reply
    assert page.locator(".turn.assistant .rate-down").last.get_attribute("aria-pressed") == "true"

    # ---- a second turn: the session id and the new turn only; the service holds the first exchange
    body = send(page, "what is the capital of france?")
    assert body["session_id"] == session and len(body["messages"]) == 1
    assert page.locator(".turn.note").count() == 0
    second = page.locator(".turn.assistant").last
    second.locator(".rate-up").click()
    second.locator(".status", has_text="saved").wait_for()
    rec2 = latest(read_records(store))[-1]
    assert rec2["rating"] == "up" and rec2["session"] == session
    assert rec2["messages"] == [{"role": "user", "content": "hello there, how are you?"},
                                {"role": "assistant", "content": reply},
                                {"role": "user", "content": "what is the capital of france?"}]

    # ---- a session the service does not hold (as after its restart): a note, and the record says what the model saw
    page.evaluate("""() => {
        const old = localStorage.getItem('forgeline.session');
        localStorage.setItem('forgeline.session', 'sess-forgotten');
        localStorage.setItem('forgeline.turns.sess-forgotten', localStorage.getItem('forgeline.turns.' + old));
    }""")
    page.reload(wait_until="networkidle")
    send(page, "please repeat after me")
    page.locator(".turn.note").wait_for()
    third = page.locator(".turn.assistant").last
    third.locator(".rate-up").click()
    third.locator(".status", has_text="saved").wait_for()
    rec3 = latest(read_records(store))[-1]
    assert rec3["session"] == "sess-forgotten"
    assert rec3["messages"] == [{"role": "user", "content": "please repeat after me"}]
    assert (ARTIFACTS / "chat-page.png").stat().st_size > 5_000
    print(json.dumps({"reply": reply, "stream_states": len(states)}))
