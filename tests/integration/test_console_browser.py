"""The operator console in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium through the system chromedriver; never a downloaded driver) against the real gateway
process on a small random model: sign in, upload adapters by drag and drop, train and watch the
loss curve grow, run an experiment and read its results, compare two adapters in the playground.
Every step is asserted on what the page shows; screenshots go to tests/artifacts/console/.

Plus the refusals as a browser meets them: nothing works without a session, a state-changing call
without the CSRF token gets a 403, and hostile text (file names, dataset content, prompts) is shown
as text, never turned into elements."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from support import build_small_llama, build_tokenizer, make_peft_adapter



pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip("the console's browser tests need Debian's chromium and chromium-driver "
                "(apt-get install chromium chromium-driver)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "console-browser-admin-key-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ARTIFACTS = REPO / "tests" / "artifacts" / "console"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
WAIT = 90


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("console-browser")
    tokenizer = build_tokenizer()
    model = build_small_llama(len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for seed, name in enumerate(("adapter-a", "adapter-b")):
        make_peft_adapter(model, "lora", root / name, seed=seed + 1, r=8, lora_alpha=16)
    lines = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]}
             for w in ("red", "green", "blue", "gold", "pink", "gray", "teal", "navy")]
    (root / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines * 4) + "\n")
    bad = [lines[0], {"messages": [{"role": HOSTILE, "content": HOSTILE}]}, {HOSTILE: HOSTILE}]
    (root / "bad.jsonl").write_text("\n".join(json.dumps(line) for line in bad) + "\n")
    hostile_dir = root / "hostile"
    hostile_dir.mkdir()
    (hostile_dir / f"{HOSTILE}.bin").write_bytes(b"not an adapter")
    return {"root": root, "model": root / "model", "a": root / "adapter-a", "b": root / "adapter-b",
            "train": root / "train.jsonl", "bad": root / "bad.jsonl", "hostile": hostile_dir / f"{HOSTILE}.bin"}


@pytest.fixture(scope="module")
def server(launch_server, files, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("console-browser-data")
    return launch_server(["--model", str(files["model"]), "--quantization", "none", "--device", "cpu",
                          "--data-dir", str(data_dir)], env={"GATEWAY_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture(scope="module")
def browser():
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1100", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    if previous is None:
        os.environ.pop("SE_OFFLINE", None)
    else:
        os.environ["SE_OFFLINE"] = previous


def shot(driver, name: str, focus: str | None = None) -> None:
    if focus:  # what the step is about, in view
        driver.execute_script("const e = document.querySelector(arguments[0]); if (e) e.scrollIntoView()", focus)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def wait(driver, condition, timeout: float = WAIT):
    # pages redraw while they poll: an element found a moment ago may be gone; look again
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(condition)


def texts(driver, css: str) -> list[str]:
    """The text of every match, read in one script run (no stale elements between reads)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css)


def text(driver, css: str) -> str:
    found = texts(driver, css)
    return found[0] if found else ""


def click(driver, css: str) -> None:
    wait(driver, lambda d: find(d, css).click() or True)


def find(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def finds(driver, css: str):
    return driver.find_elements(By.CSS_SELECTOR, css)


def no_injected_elements(driver) -> None:
    """Hostile text stayed text: no <img> anywhere, and nothing it could run did run."""
    assert driver.execute_script("return document.querySelectorAll('img').length") == 0
    assert driver.execute_script("return window.__pwned === undefined")


def page_fetch(driver, method: str, path: str) -> int:
    """The status of a fetch made by the page itself (its cookie rides along; no CSRF header)."""
    return driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[1], {method: arguments[0], credentials: 'same-origin'}).then(r => done(r.status));",
        method, path)


def go(driver, server, page: str) -> None:
    driver.get(f"{server.url}/console/#/{page}")
    wait(driver, lambda d: not find(d, f"#page-{page}").get_attribute("hidden") and find(d, f"#page-{page} h1"))


def test_01_nothing_works_without_a_session(browser, server):
    browser.get(f"{server.url}/console/")
    wait(browser, lambda d: find(d, "#sign-in").is_displayed())
    assert not find(browser, "#app").is_displayed() and not find(browser, "#nav").is_displayed()
    for path in ("/console/api/status", "/admin/adapters", "/admin/training-jobs", "/admin/experiments"):
        assert page_fetch(browser, "GET", path) == 401, path
    find(browser, "#admin-key").send_keys("not-the-admin-key-123")
    click(browser, "#sign-in-button")
    wait(browser, lambda d: "not the admin key" in text(d, "#sign-in-message"))
    assert browser.get_cookies() == []
    shot(browser, "01-sign-in-refused")


def test_02_sign_in_and_overview(browser, server):
    find(browser, "#admin-key").send_keys(ADMIN_KEY)
    click(browser, "#sign-in-button")
    wait(browser, lambda d: find(d, "#nav").is_displayed())
    cookie = next(c for c in browser.get_cookies() if c["name"] == "gateway_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # not readable by scripts
    assert ADMIN_KEY not in browser.page_source
    assert browser.execute_script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage)") == "{}{}"
    wait(browser, lambda d: finds(d, '[data-stat="base-model"]'))
    assert text(browser, '[data-stat="base-model"]') == "model"
    assert text(browser, '[data-stat="device"]').startswith("cpu")
    assert text(browser, '[data-stat="queue-depth"]') == "0"
    assert text(browser, '#tiers [data-tier="device"]') == "0"
    shot(browser, "02-overview")


def test_03_state_changes_without_csrf_are_refused(browser, server):
    assert page_fetch(browser, "GET", "/admin/adapters") == 200  # the cookie alone reads
    assert page_fetch(browser, "POST", "/admin/experiments") == 403  # but never writes
    assert page_fetch(browser, "DELETE", "/admin/adapters/anything") == 403
    assert page_fetch(browser, "POST", "/v1/chat/completions") == 403


def drop_files(driver, zone_css: str, paths: list[Path]) -> None:
    """Drag and drop of real files: a temporary file input takes them, a synthetic drop event
    carries them (WebDriver cannot drag from the desktop)."""
    driver.execute_script("const i = document.createElement('input'); i.type = 'file'; i.multiple = true;"
                          "i.id = 'test-drop-source'; document.body.append(i);")
    find(driver, "#test-drop-source").send_keys("\n".join(str(p) for p in paths))
    driver.execute_script(
        "const source = document.getElementById('test-drop-source'); const data = new DataTransfer();"
        "for (const f of source.files) data.items.add(f);"
        "const zone = document.querySelector(arguments[0]);"
        "zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: data, bubbles: true, cancelable: true}));"
        "zone.dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));"
        "source.remove();", zone_css)


def test_04_upload_adapters_and_see_them_listed(browser, server, files):
    go(browser, server, "adapters")
    find(browser, "#upload-id").send_keys("adapter-a")
    drop_files(browser, "#dropzone", [files["a"] / "adapter_config.json", files["a"] / "adapter_model.safetensors"])
    wait(browser, lambda d: text(d, "#upload-status") == "registered adapter-a (lora)")
    # the second by the file picker
    find(browser, "#upload-id").send_keys("adapter-b")
    find(browser, "#upload-files").send_keys(f"{files['b'] / 'adapter_config.json'}\n{files['b'] / 'adapter_model.safetensors'}")
    wait(browser, lambda d: text(d, "#upload-status") == "registered adapter-b (lora)")
    wait(browser, lambda d: texts(d, "#adapters-table .adapter-id") == ["adapter-a", "adapter-b"])
    assert texts(browser, '#adapters-table tr[data-adapter="adapter-a"] td')[1:5] == ["lora", "8", "cpu", "no"]
    # sorting and filtering
    click(browser, '#adapters-table th[data-sort="id"]')
    wait(browser, lambda d: texts(d, "#adapters-table .adapter-id") == ["adapter-b", "adapter-a"])
    find(browser, "#adapters-filter").send_keys("-a")
    wait(browser, lambda d: texts(d, "#adapters-table .adapter-id") == ["adapter-a"])
    # Selenium's clear() sends no input event: empty the box the way typing would
    browser.execute_script("const f = document.querySelector('#adapters-filter'); f.value = '';"
                           "f.dispatchEvent(new Event('input'))")
    wait(browser, lambda d: texts(d, "#adapters-table .adapter-id") == ["adapter-b", "adapter-a"])
    click(browser, '#adapters-table tr[data-adapter="adapter-a"] [data-action="pin"]')
    wait(browser, lambda d: text(d, '#adapters-table tr[data-adapter="adapter-a"] .pinned') == "yes")
    shot(browser, "04-adapters")


def test_05_upload_refusal_is_shown_as_text(browser, server, files):
    expected = httpx.post(f"{server.url}/admin/adapters", headers=ADMIN, files=[
        ("files", (files["hostile"].name, b"not an adapter", "application/octet-stream"))]).json()["error"]["message"]
    drop_files(browser, "#dropzone", [files["hostile"]])
    wait(browser, lambda d: text(d, "#upload-status") == expected)
    assert "error" in find(browser, "#upload-status").get_attribute("class")
    no_injected_elements(browser)
    shot(browser, "05-upload-refused")


def test_06_dataset_problems_are_shown_in_place_as_text(browser, server, files):
    expected = httpx.post(f"{server.url}/admin/training-jobs", headers=ADMIN, files={
        "dataset": ("bad.jsonl", files["bad"].read_bytes(), "application/jsonl")}).json()["error"]["message"]
    assert "line 2" in expected
    go(browser, server, "training")
    wait(browser, lambda d: finds(d, "#training-form"))
    find(browser, "#training-dataset").send_keys(str(files["bad"]))
    click(browser, "#training-start")
    wait(browser, lambda d: find(d, "#dataset-problems").is_displayed())
    assert text(browser, "#dataset-problems") == expected
    no_injected_elements(browser)
    shot(browser, "06-dataset-problems", "#training-form")


def test_07_train_and_watch_the_loss_curve_grow(browser, server, files):
    go(browser, server, "training")
    wait(browser, lambda d: finds(d, "#training-form"))
    placeholder = find(browser, 'input[data-setting="batch_size"]').get_attribute("placeholder")
    assert placeholder == "4"  # the defaults are shown
    find(browser, "#training-dataset").send_keys(str(files["train"]))
    Select(find(browser, "#training-kind")).select_by_value("lora")
    browser.execute_script("document.querySelector('#training-settings').closest('details').open = true")
    for name, value in (("max_steps", "40"), ("batch_size", "2"), ("eval_fraction", "0.25"), ("r", "4"),
                        ("adapter_id", "trained-a")):
        find(browser, f'input[data-setting="{name}"]').send_keys(value)
    click(browser, "#training-start")
    wait(browser, lambda d: finds(d, "#training-job-id"))
    seen: list[int] = []

    def finished(d) -> bool:
        paths = finds(d, '#loss-chart path[data-series="train"]')
        try:
            count = int(paths[0].get_attribute("data-points")) if paths else 0
        except Exception:  # noqa: BLE001 - the chart was redrawn between the two calls
            return False
        if count and (not seen or seen[-1] != count):
            seen.append(count)
            if len(seen) == 2:
                shot(d, "07-training-running", "#training-detail")
        return text(d, "#training-job-state") in ("succeeded", "failed", "cancelled")

    wait(browser, finished, timeout=300)
    assert text(browser, "#training-job-state") == "succeeded", text(browser, "#training-detail")
    final = int(find(browser, '#loss-chart path[data-series="train"]').get_attribute("data-points"))
    seen.append(final)
    assert len(set(seen)) >= 2 and seen == sorted(seen) and final == 40, seen  # it grew while we watched
    assert finds(browser, '#loss-chart path[data-series="eval"]')
    assert text(browser, "#training-step") == "40"
    assert text(browser, "#training-result a") == "trained-a"
    assert "null" not in text(browser, "#training-detail") and "undefined" not in text(browser, "#training-detail")
    shot(browser, "07-training-done", "#training-detail")
    click(browser, "#training-result a")
    wait(browser, lambda d: texts(d, "#adapters-table .adapter-id") == ["trained-a"])
    assert find(browser, "#adapters-filter").get_attribute("value") == "trained-a"


def test_08_experiment_with_live_results(browser, server):
    go(browser, server, "experiments")
    wait(browser, lambda d: finds(d, "#experiment-form .arm-model"))
    find(browser, "#experiment-name").send_keys("ab-test")
    selects = finds(browser, "#experiment-form .arm-model")
    Select(selects[0]).select_by_value("adapter-a")
    Select(selects[1]).select_by_value("adapter-b")
    click(browser, "#experiment-create")
    wait(browser, lambda d: finds(d, '[data-experiment="ab-test"] .results tr[data-arm="adapter-b"]'))
    # users are split between the arms by a hash salted per experiment: send users until each arm
    # has the two samples a score interval needs (8 users leave one arm short 7% of the time)
    per_arm, thumbs = {"adapter-a": 0, "adapter-b": 0}, {"up": 0, "down": 0}
    user = 0
    while min(per_arm.values()) < 2 or user < 8:
        response = httpx.post(f"{server.url}/v1/chat/completions", timeout=WAIT, json={
            "model": "ab-test", "user": f"user-{user}", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, response.text
        per_arm[response.headers["x-gateway-experiment-arm"]] += 1
        thumb = "up" if user % 3 else "down"
        thumbs[thumb] += 1
        feedback = httpx.post(f"{server.url}/v1/feedback", timeout=WAIT, json={
            "id": response.json()["id"], "thumbs": thumb, "score": user % 8 / 8})
        assert feedback.status_code == 200, feedback.text
        user += 1
        assert user < 28, per_arm  # both arms should have two users long before (and each under 30, no verdict)

    def requests_shown(d) -> int:
        try:
            return sum(int(t) for t in texts(d, '[data-experiment="ab-test"] .arm-requests'))
        except Exception:  # noqa: BLE001 - redrawn between the calls
            return -1

    wait(browser, lambda d: requests_shown(d) == user)
    wait(browser, lambda d: len(finds(d, '[data-experiment="ab-test"] .ci-line')) == 4)  # thumbs and score, per arm
    verdicts = texts(browser, '[data-experiment="ab-test"] .verdict')
    assert len(verdicts) == 2 and all("not enough data yet" in v for v in verdicts), verdicts  # 30 samples needed
    ups = texts(browser, '[data-experiment="ab-test"] .thumbs-up')
    downs = texts(browser, '[data-experiment="ab-test"] .thumbs-down')
    assert (sum(map(int, ups)), sum(map(int, downs))) == (thumbs["up"], thumbs["down"]), (ups, downs)
    shot(browser, "08-experiment-results")
    # ramp: adapter-b to 80 (adapter-a keeps 50)
    slider = find(browser, '[data-experiment="ab-test"] .weight-slider[data-arm="adapter-b"]')
    browser.execute_script("arguments[0].value = '80'; arguments[0].dispatchEvent(new Event('change'))", slider)
    wait(browser, lambda d: httpx.get(f"{server.url}/admin/experiments/ab-test", headers=ADMIN).json()["arms"][1]["weight"] == 80)
    wait(browser, lambda d: "61.5 %" in text(d, '[data-experiment="ab-test"] .results tr[data-arm="adapter-b"]'))
    # deleting an adapter an experiment holds: the 409 explained
    go(browser, server, "adapters")
    wait(browser, lambda d: finds(d, '#adapters-table tr[data-adapter="adapter-b"] [data-action="delete"]'))
    browser.execute_script("window.confirm = () => true")
    click(browser, '#adapters-table tr[data-adapter="adapter-b"] [data-action="delete"]')
    wait(browser, lambda d: "409" in text(d, "#adapters-status"))
    assert "experiment" in text(browser, "#adapters-status")
    shot(browser, "08-delete-conflict")
    go(browser, server, "experiments")
    wait(browser, lambda d: finds(d, '[data-experiment="ab-test"] [data-action="promote"]'))
    Select(find(browser, '[data-experiment="ab-test"] .promote-arm')).select_by_value("adapter-b")
    click(browser, '[data-experiment="ab-test"] [data-action="promote"]')
    wait(browser, lambda d: "winner adapter-b" in text(d, '[data-experiment="ab-test"] .experiment-state'))
    shot(browser, "08-experiment-promoted")


def test_09_playground_compares_two_adapters(browser, server):
    go(browser, server, "playground")
    wait(browser, lambda d: finds(d, "#playground-columns .model-select"))
    click(browser, "#pg-add-column")
    selects = finds(browser, "#playground-columns .model-select")
    assert len(selects) == 2
    Select(selects[0]).select_by_value("adapter-a")
    Select(selects[1]).select_by_value("adapter-b")
    find(browser, "#pg-max-tokens").clear()
    find(browser, "#pg-max-tokens").send_keys("12")
    find(browser, "#pg-prompt").send_keys(HOSTILE)
    click(browser, "#pg-send")
    wait(browser, lambda d: len(finds(d, '.turn-assistant[data-done="true"]')) == 2)
    replies = finds(browser, ".turn-assistant")
    assert [r.get_attribute("data-model") for r in replies] == ["adapter-a", "adapter-b"]
    answers = texts(browser, ".turn-assistant .text")
    assert len(answers) == 2 and all(answers), answers
    assert texts(browser, ".turn-user .text") == [HOSTILE, HOSTILE]  # the prompt, as text
    statuses = texts(browser, ".column-status")
    assert len(statuses) == 2 and all(t.startswith("done (") for t in statuses), statuses
    no_injected_elements(browser)
    shot(browser, "09-playground-compare")


def test_09b_playground_feedback_on_an_experiment_reply(browser, server):
    created = httpx.post(f"{server.url}/admin/experiments", headers=ADMIN, json={
        "name": "ab-live", "stickiness": "request",
        "arms": [{"name": "adapter-a", "weight": 1}, {"name": "adapter-b", "weight": 1}]})
    assert created.status_code == 201, created.text
    go(browser, server, "overview")
    go(browser, server, "playground")  # shown again: the model list now has ab-live
    wait(browser, lambda d: finds(d, "#playground-columns .model-select"))
    click(browser, "#pg-add-column")
    selects = finds(browser, "#playground-columns .model-select")
    Select(selects[0]).select_by_value("adapter-a")
    Select(selects[1]).select_by_value("ab-live")
    find(browser, "#pg-prompt").send_keys("hello")
    click(browser, "#pg-send")
    wait(browser, lambda d: len(finds(d, '.turn-assistant[data-done="true"]')) == 2)
    statuses = texts(browser, ".column-status")
    assert statuses[1].split(" · arm ")[1] in ("adapter-a", "adapter-b"), statuses  # the arm that answered
    assert not finds(browser, '[data-column="0"] .thumbs-up-button')  # a plain adapter takes no feedback
    click(browser, '[data-column="1"] .thumbs-up-button')
    wait(browser, lambda d: text(d, '[data-column="1"] .feedback-status'))
    assert text(browser, '[data-column="1"] .feedback-status') == " thumbs up recorded"
    results = httpx.get(f"{server.url}/admin/experiments/ab-live/results", headers=ADMIN).json()
    assert sum(arm["feedback"]["thumbs"]["up"] for arm in results["arms"]) == 1
    shot(browser, "09-playground-feedback")


def test_10_sign_out(browser, server):
    click(browser, "#sign-out")
    wait(browser, lambda d: find(d, "#sign-in").is_displayed())
    assert text(browser, "#sign-in-message") == "Signed out."
    assert page_fetch(browser, "GET", "/admin/adapters") == 401
    shot(browser, "10-signed-out")
