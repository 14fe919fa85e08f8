"""The Prefect UI as a person uses it: the v2 deployment page's Custom run form, in headless Chromium (Debian's
package, driven by Playwright), against a real `prefect server start` and a served deployment."""

import sys
import time

import pytest

from tests.conftest import STAGES, make_repo
from tests.harness import Server, browser, stop


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("ui-home")).start()
    repo = make_repo(tmp_path_factory.mktemp("ui-repo"))
    serve = server.spawn(sys.executable, "-m", "flows.serve", cwd=repo)
    try:
        yield server, repo, server.deployment(paused=False)
    finally:
        stop(serve)
        server.stop()


@pytest.fixture(scope="module")
def page():
    pw, chromium = browser()
    page = chromium.new_page(viewport={"width": 1300, "height": 1100})
    yield page
    chromium.close()
    pw.stop()


def custom_run_form(page, server, dep) -> None:
    """The deployment page -> Run -> Custom run, as a person clicks through it."""
    page.goto(f"http://127.0.0.1:{server.port}/v2/deployments/deployment/{dep['id']}")
    page.get_by_role("button", name="Run").first.click()
    page.get_by_role("menuitem", name="Custom run").click()
    page.get_by_text("epochs (Optional)", exact=True).wait_for(timeout=30_000)


def field(page, title: str):
    """The input under a form field's title."""
    return page.locator(f"xpath=//*[normalize-space(text())='{title} (Optional)']/ancestor::*[.//input][1]//input").first


def submit(page) -> tuple[int, dict]:
    """Click Submit; the server's answer to the create-flow-run request the form sends."""
    with page.expect_response(lambda r: "create_flow_run" in r.url, timeout=30_000) as answer:
        page.get_by_role("button", name="Submit").click()
    return answer.value.status, answer.value.json()


def test_the_unchanged_form_starts_a_run_that_completes(served, page, tmp_path):
    server, repo, dep = served
    t0 = time.perf_counter()
    custom_run_form(page, server, dep)
    assert field(page, "epochs").input_value() == "3" and field(page, "lr").input_value() == "0.01"  # params.yaml's
    assert page.get_by_text("Peak learning rate of AdamW (cosine decay). Allowed: > 0, ≤ 10.").count() == 1  # bounds shown
    page.screenshot(path=tmp_path / "form.png", full_page=True)
    status, created = submit(page)
    assert status == 201, created
    run = server.wait(created["id"])
    print(f"browser: form opened, submitted unchanged, run completed in {time.perf_counter() - t0:.1f} s")
    assert run["state"]["type"] == "COMPLETED"
    assert server.task_states(run["id"]) == {s: "Completed" for s in STAGES}


def test_a_value_changed_in_the_form_trains_with_it_as_an_experiment(served, page):
    server, repo, dep = served
    custom_run_form(page, server, dep)
    field(page, "epochs").fill("2")
    status, created = submit(page)
    assert status == 201, created
    run = server.wait(created["id"])
    assert run["state"]["type"] == "COMPLETED" and run["state"]["name"] == "Not promoted"  # 2 epochs lose to 3
    summary = server.artifacts(run["id"])["training-summary"]
    assert "`train.epochs`: 3 → 2" in summary and "DVC experiment `prefect-" in summary


def test_an_out_of_bounds_value_is_refused_naming_the_field_and_nothing_runs(served, page):
    server, repo, dep = served
    before = len(server.call("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}))
    custom_run_form(page, server, dep)
    field(page, "lr").fill("-1")
    status, answer = submit(page)
    assert status == 409 and "train.lr" in answer["detail"] and "minimum of 0" in answer["detail"]
    page.get_by_text("Validation failed for field 'train.lr'").wait_for(timeout=10_000)  # what the person sees
    after = len(server.call("POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}))
    assert after == before
