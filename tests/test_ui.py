"""Retrain from the Prefect UI, end to end in a real browser (headless Chromium via Playwright):
open the LLM deployment, start a Custom run with more pretraining steps than configured, wait for
it to complete, then find in MLflow the new model version whose lineage tags name that flow run.

Screenshots of the filled form and of the finished run go to $FORGELINE_TEST_ARTIFACTS
(default .forgeline/test-artifacts/) as ui-custom-run-form.png and ui-finished-run.png.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.test_stack import DEPLOYMENT, shared_stack

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("FORGELINE_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / ".forgeline" / "test-artifacts")
MAX_STEPS = 9  # configs/pretrain.yaml says 300, the session's runs used 6: this run differs from both


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/install.sh does)")
    stack = shared_stack(request, tmp_path_factory)
    assert stack.wait(stack.runs["first"], timeout=900).state_type.value == "COMPLETED", stack.log_tail()
    return stack


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 1400, "height": 1000},
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"])
        context.set_default_timeout(60_000)
        try:
            yield context
        finally:
            context.close()


def form_field(scope, label: str):
    """The schema-form property within `scope` (the page or a section) whose label is `label`, with
    or without ' (Optional)' (innermost, e.g. 'Max Steps')."""
    name = scope.locator(".schema-form-property__label", has_text=re.compile(f"^{re.escape(label)}( \\(Optional\\))?$"))
    return name.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")


def start_custom_run(page, ui_url: str, deployment_id: str, max_steps: int, shot: Path) -> str:
    """Deployment page → Run → Custom run → pretrain max_steps → Submit; returns the flow run id (the
    browser is left on the run's page)."""
    page.goto(f"{ui_url}/deployments/deployment/{deployment_id}", wait_until="networkidle")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_url("**/run?**")
    field = form_field(form_field(page, "Pretrain"), "Max Steps")  # sft, reward and rlhf have one too
    field.get_by_role("button", name="int", exact=True).click()
    field.locator("input").fill(str(max_steps))
    field.scroll_into_view_if_needed()
    page.screenshot(path=str(shot))
    with page.expect_response(lambda r: r.url.endswith("/create_flow_run") and r.request.method == "POST") as created:
        page.get_by_role("button", name="Submit", exact=True).click()
    assert created.value.ok, created.value.text()
    run_id = created.value.json()["id"]
    page.get_by_text("scheduled to start").first.wait_for()  # the UI's toast
    page.goto(f"{ui_url}/runs/flow-run/{run_id}", wait_until="networkidle")
    return run_id


def test_retrain_from_the_ui(stack, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with stack.client() as client:
        dep = client.read_deployment_by_name(DEPLOYMENT)
    page = browser.new_page()
    t0 = time.monotonic()
    run_id = start_custom_run(page, stack.state["prefect_ui_url"], str(dep.id), MAX_STEPS,
                              ARTIFACTS / "ui-custom-run-form.png")
    run = stack.flow_run(run_id)
    assert run.deployment_id == dep.id
    assert run.parameters["params"]["pretrain"]["max_steps"] == MAX_STEPS  # what the form said
    done = stack.wait(run_id, timeout=900)
    assert done.state_type.value == "COMPLETED", (done.state, stack.log_tail())
    page.reload(wait_until="networkidle")
    page.get_by_text("Completed").first.wait_for()
    page.screenshot(path=str(ARTIFACTS / "ui-finished-run.png"))
    print(f"UI custom run {run.name} completed in {time.monotonic() - t0:.0f}s; screenshots in {ARTIFACTS}")

    # MLflow: a new version of the model, its lineage tags naming this flow run
    client = stack.mlflow()
    (version,) = client.search_model_versions(f"name='forgeline-llm' and tags.`prefect.flow_run_id` = '{run_id}'")
    assert client.get_model_version_by_alias("forgeline-llm", "candidate").version == version.version
    aligned = client.get_run(version.run_id)  # the rlhf run; its lineage leads to the pretraining the form changed
    assert aligned.data.tags["prefect.flow_run_id"] == run_id and version.tags["forgeline.stage"] == "rlhf"
    assert version.tags["git.commit"] == aligned.data.tags["git.commit"]
    assert version.tags["dvc.out.data/rlhf"] == aligned.data.tags["dvc.out.data/rlhf"]
    sft = client.get_run(aligned.data.tags["lineage.upstream.sft"])
    train = client.get_run(sft.data.tags["lineage.upstream.pretrain"])
    assert train.data.tags["prefect.flow_run_id"] == run_id and train.data.params["max_steps"] == str(MAX_STEPS)
    assert (ARTIFACTS / "ui-custom-run-form.png").stat().st_size > 10_000
