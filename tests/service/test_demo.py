"""The /demo page in a real headless browser (Debian's chromium driven by Playwright), and its routes.

The browser test streams a shipped test sample of a shipped model and checks that the page shows
the prediction that POST /v1/classify gives for the same steps. The screenshot is kept under the
test's tmp dir and copied to artifacts/demo.png. Skipped (with the reason) without chromium or
playwright: ``scripts/setup`` installs both where it can.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "exported"
PREFERRED = ("japanesevowels-sliding", "mnist1d-sliding")
CHROMIUM = os.environ.get("PSN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _playwright():
    """Playwright's sync API, with a real Chromium to drive (the test is skipped, saying why, without)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set PSN_CHROMIUM)")
    return sync_api


def _shipped_model() -> str:
    names = [n for n in PREFERRED if (SHIPPED / n / "reference.json").is_file()]
    if not names:
        pytest.skip("no shipped model with reference.json under exported/")
    return names[0]


@pytest.fixture
def shipped(serve):
    return serve(model_dir=SHIPPED, dtype="float32")


def test_demo_routes_serve_the_page_and_shipped_samples(shipped) -> None:
    name = _shipped_model()
    with httpx.Client(base_url=shipped.url, timeout=20) as c:
        page = c.get("/demo")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/demo/static/demo.js">' in page.text
        for f, kind in (("demo.js", "javascript"), ("demo.css", "css")):
            r = c.get(f"/demo/static/{f}")
            assert r.status_code == 200 and kind in r.headers["content-type"] and len(r.text) > 500
        samples = c.get(f"/demo/samples/{name}").json()["samples"]
        ref = json.loads((SHIPPED / name / "reference.json").read_text())
        lengths = ref.get("lengths") or [len(ref["x"])] * len(ref["y"])
        assert [len(s["steps"]) for s in samples] == lengths  # without padding
        assert [s["steps"][-1] for s in samples] == [ref["x"][n - 1][i] for i, n in enumerate(lengths)]
        for s in samples:  # each sample's steps, classified by the API, give the stored prediction
            r = c.post("/v1/classify", json={"model": name, "steps": s["steps"]}).json()
            assert r["predicted"] == s["predicted"]
        for bad in ("/demo/samples/nope", "/demo/samples/%2E%2E", "/demo/static/index.html",
                    "/demo/static/..%2Fdemo.py"):
            r = c.get(bad)
            assert r.status_code == 404, bad
        assert c.get("/demo/samples/nope").json()["error"]["code"] == "model_not_found"


def test_demo_page_streams_a_sample_in_a_real_browser(shipped, tmp_path) -> None:
    sync_api = _playwright()
    name = _shipped_model()
    with httpx.Client(base_url=shipped.url, timeout=20) as c:
        sample = c.get(f"/demo/samples/{name}").json()["samples"][1]
        api = c.post("/v1/classify", json={"model": name, "steps": sample["steps"]}).json()
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1150, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{shipped.url}/demo?model={name}")
            page.wait_for_selector("#status[data-state=idle]", timeout=20_000)
            assert page.input_value("#model") == name
            page.select_option("#sample", "1")
            page.eval_on_selector("#delay", "e => { e.value = 5; e.dispatchEvent(new Event('input')); }")
            page.click("#play")
            page.wait_for_selector("#status[data-state=done]", timeout=60_000)
            shown = page.text_content("#prediction")
            label = page.text_content("#label")
            steps = page.text_content("#step")
            inked = page.evaluate("""id => { const c = document.getElementById(id);
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""", "raster")
            traced = page.evaluate("""() => { const c = document.getElementById('input');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
            bars = page.eval_on_selector_all(".bar > div", "els => els.map(e => parseFloat(e.style.width))")
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert shown == api["label"], (shown, api)  # the page shows what the API answers for the same steps
    assert label == sample["label_name"]
    assert steps == f"{len(sample['steps'])} / {len(sample['steps'])}"
    assert inked > 0 and traced > 0  # spikes and the input trace were drawn
    assert len(bars) == len(api["scores"]) and max(bars) == bars[api["predicted"]]
    out = REPO / "artifacts"
    out.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "demo.png", out / "demo.png")
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_page_takes_an_api_key_in_a_real_browser(serve) -> None:
    """With access control on, the page's files load without a key; its API calls (fetch with Authorization,
    the WebSocket with a psn.key.<key> subprotocol next to psn.json.v1) work once the key is typed in."""
    sync_api = _playwright()
    name, key = _shipped_model(), "demo-key-0123456789abcdef"
    srv = serve(model_dir=SHIPPED, dtype="float32", api_keys=key)
    with httpx.Client(base_url=srv.url, timeout=20, headers={"Authorization": f"Bearer {key}"}) as c:
        sample = c.get(f"/demo/samples/{name}").json()["samples"][0]
        api = c.post("/v1/classify", json={"model": name, "steps": sample["steps"]}).json()
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{srv.url}/demo?model={name}")
            page.wait_for_selector("#status[data-state=key]", timeout=20_000)  # 401: asks for the key
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.fill("#key", key)
            page.dispatch_event("#key", "change")  # as leaving the field does
            page.wait_for_selector("#status[data-state=idle]", timeout=20_000)
            page.select_option("#sample", "0")
            page.eval_on_selector("#delay", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
            page.click("#play")
            page.wait_for_selector("#status[data-state=done]", timeout=60_000)
            shown = page.text_content("#prediction")
        finally:
            browser.close()
    assert not errors, errors
    assert shown == api["label"]
