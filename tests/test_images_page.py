"""The chat page's Images section in a real browser (Debian's Chromium, headless, through Playwright):
the whole app under uvicorn on 127.0.0.1 with test_images_api's tiny GAN (a few steps of gan_train's
own loop), VQ and text-to-image folders; open the section, generate 4 faces, then 2 VQ images through
the whole serving path (2x super-resolution), check each image decoded in the browser (naturalWidth)
at the size asked; a seed gives the same images again; an error shows the service's message; t2i
shows the prompt it drew from.

The screenshot goes to $FORGELINE_TEST_ARTIFACTS (default .forgeline/test-artifacts/) as images-page.png.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_images_api import model_env, start_app, tiny_gan, tiny_t2i, tiny_vq
from tests.test_serve_llm import stop_server
from tests.test_ui import ARTIFACTS, CHROMIUM, browser  # noqa: F401 (browser: the fixture)

pytestmark = pytest.mark.slow   # a browser and a server: end to end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/install.sh does)")
    tmp = tmp_path_factory.mktemp("images_page")
    proc, url = start_app(model_env(tiny_gan(tmp, steps=20), tiny_vq(tmp), tiny_t2i(tmp)), tmp)
    yield url
    out = stop_server(proc)
    assert "Traceback" not in out, out


def generate(page, model: str, n: int, seed: str = "") -> list[str]:
    """Fill the form, click Generate, wait for the answer; the grid's image sources."""
    page.locator("#image-model").select_option(model)
    page.locator("#image-n").fill(str(n))
    page.locator("#image-seed").fill(seed)
    with page.expect_response(lambda r: r.url.endswith("/v1/images/generations")):
        page.locator("#image-generate").click()
    page.locator("#image-generate:not([disabled])").wait_for()
    return page.locator("#image-grid img").evaluate_all("imgs => imgs.map(i => i.src)")


def loaded_sizes(page) -> list[list[int]]:
    page.wait_for_function("[...document.querySelectorAll('#image-grid img')].every(i => i.complete)")
    return page.locator("#image-grid img").evaluate_all("imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")


def test_generate_images_in_the_page(server, browser):
    page = browser.new_page()
    page.goto(server, wait_until="networkidle")
    assert not page.locator("#image-form").is_visible()   # closed until asked for
    page.locator("#images summary").click()
    page.locator("#image-prompt").fill("a face with glasses")

    faces = generate(page, "gan", 4, seed="7")
    assert len(faces) == 4 and all(s.startswith("data:image/png;base64,") for s in faces)
    assert loaded_sizes(page) == [[32, 32]] * 4
    captions = page.locator("#image-grid figcaption").all_text_contents()
    assert captions == ["seed 7", "seed 8", "seed 9", "seed 10"]
    assert "unconditional" in page.locator("#image-status").text_content()
    assert page.locator("#image-grid img").first.bounding_box()["width"] >= 96   # shown large, not 32 px

    vq = generate(page, "vq", 2)
    assert len(vq) == 2 and loaded_sizes(page) == [[32, 32]] * 2   # 16x16 tokenizer, 2x upsampled
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "images-page.png"), full_page=True)

    assert generate(page, "gan", 4, seed="7") == faces   # the seed reproduces them

    # an error: the service's message, the last images stay
    generate(page, "t2i", 1)   # "a face with glasses": no shape or colour t2i can draw
    status = page.locator("#image-status")
    assert status.text_content().startswith("400: ") and "names no shape or colour" in status.text_content()
    assert "refusal" in status.get_attribute("class") and page.locator("#image-grid img").count() == 4

    # t2i draws what the prompt says, in its words
    page.locator("#image-prompt").fill("Two small green triangles, please")
    assert len(generate(page, "t2i", 2, seed="1")) == 2 and loaded_sizes(page) == [[16, 16]] * 2
    assert page.locator("#image-grid figcaption").all_text_contents() == [
        "seed 1 · two small green triangles", "seed 2 · two small green triangles"]
    assert "refusal" not in status.get_attribute("class") and "unconditional" not in status.text_content()
