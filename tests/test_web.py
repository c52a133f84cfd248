"""`toucan web`: the real Gradio page driven in headless Chromium (Debian's, via Playwright's Python
package: no browser download), plus the bind/auth rules."""

import os
import shutil
from pathlib import Path

import pytest

from conftest import free_port
from test_engine import REPLY, train_parrot
from toucan.config import WebConfig
from toucan.engine import Engine
from toucan.errors import ConfigError
from toucan.sampling import SamplingParams
from toucan.serve.web import check_bind

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_non_loopback_needs_auth_or_insecure(tmp_path):
    default = WebConfig(model="m")
    assert check_bind(default.host, default.auth, default.insecure) is None  # 127.0.0.1 by default
    with pytest.raises(ConfigError, match="--auth"):
        check_bind("0.0.0.0", None, False)
    assert check_bind("0.0.0.0", "ann:pw", False) == [("ann", "pw")]
    f = tmp_path / "users"
    f.write_text("# users\nann:pw\n\nbob:s3:cret\n")
    assert check_bind("0.0.0.0", str(f), False) == [("ann", "pw"), ("bob", "s3:cret")]
    assert check_bind("0.0.0.0", None, True) is None
    with pytest.raises(ConfigError, match="user:pass"):
        check_bind("0.0.0.0", "nopass", False)


@pytest.fixture(scope="module")
def page_url(tiny_tok):
    import torch

    torch.set_num_threads(1)
    engine = Engine(train_parrot(tiny_tok), tiny_tok)
    from toucan.serve.web import build_app

    # greedy through the page's own do_sample checkbox default, as a user would set it
    app = build_app(engine, SamplingParams(do_sample=False, repetition_penalty=1.0), model_name="parrot")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.mark.integration
@pytest.mark.browser
@pytest.mark.slow
def test_browser_chat_streams_and_clears(page_url):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium not installed (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.goto(page_url, wait_until="domcontentloaded")
            box = page.locator("#msg textarea")
            box.wait_for(timeout=60_000)
            # record every text the chat shows, to see the answer grow (streaming), not just arrive
            page.evaluate("""() => { window.__seen = [];
                new MutationObserver(() => { const c = document.querySelector('#chat');
                    if (c) window.__seen.push(c.innerText); })
                .observe(document.body, {subtree: true, childList: true, characterData: true}); }""")
            chat = page.locator("#chat")
            box.fill("你好")
            box.press("Enter")
            expect(chat).to_contain_text(REPLY, timeout=60_000)
            seen = page.evaluate("window.__seen")
            partial = {s for s in seen if "鳕" in s and REPLY not in s}
            assert partial, "the answer appeared all at once, not streamed"
            # a second turn (the model was trained to answer again after one turn of history)
            box.fill("你好")
            page.locator("#send").click()
            expect(chat.get_by_text(REPLY)).to_have_count(2, timeout=60_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web.png"), full_page=True)
            # another browser session has its own, empty history
            other = browser.new_context().new_page()
            other.goto(page_url, wait_until="domcontentloaded")
            other.locator("#msg textarea").wait_for(timeout=60_000)
            expect(other.locator("#chat")).not_to_contain_text(REPLY)
            # clear empties this session's history
            page.locator("#clear").click()
            expect(chat).not_to_contain_text(REPLY, timeout=30_000)
        finally:
            browser.close()
    if os.environ.get("TOUCAN_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        shutil.copy(ARTIFACTS / "web.png", Path(__file__).resolve().parents[1] / "docs" / "screenshot-web.png")
