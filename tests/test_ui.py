"""The profile explorer (/ui) in a real headless Chromium, on a real `persona serve`.

The browser is the distribution's (`apt-get install chromium chromium-driver`; `.ci/run` installs it),
driven by Selenium: nothing is downloaded. Screenshots go to the workspace's reports/ui/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_service import featured_workspace, serve, service_env, stop  # the service tests' helpers

from core.contract import EVENT_TYPES

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
API_KEY = "ui-key-456"
WAIT = 90  # seconds for one page step (a cold first /rank encodes the catalogue's text on 2 CPUs)


def _browser() -> tuple[str, str] | None:
    """The system Chromium and its driver, or None when the machine has none."""
    browser = next((p for n in ("chromium", "chromium-browser") if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.path.exists(p)), None)
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, shop):
    """A small workspace (shared sample shop, real frozen MiniLM, 2 epochs) under `persona serve` with a key."""
    root = tmp_path_factory.mktemp("ui")
    ws = featured_workspace(root, shop)
    env = service_env(ws, PERSONA_API_KEY=API_KEY)
    persona = str(BIN / "persona")
    subprocess.run([persona, "validate", "-w", str(ws), "--source", str(root / "data"), "--no-docs"],
                   env=env, check=True, capture_output=True, timeout=300)  # a data-quality summary to link
    subprocess.run([persona, "train", "-w", str(ws), "--epochs", "2", "--splits", "global", "--no-baselines",
                    "--no-refit"], env=env, check=True, capture_output=True, timeout=900)
    proc, url, server_log = serve(env, root / "server.log")
    yield url, ws
    stop(proc, server_log)


@pytest.fixture(scope="module")
def browser():
    found = _browser()
    if found is None:
        pytest.skip("no system Chromium and chromedriver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    yield driver
    driver.quit()


class Page:
    """The explorer as a person uses it: type, click, wait for what appears."""

    def __init__(self, driver, url: str, shots: Path) -> None:
        self.driver, self.url, self.shots = driver, url, shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, path: str) -> None:
        self.driver.get(self.url + path)

    def find(self, css: str):
        return self.driver.find_element("css selector", css)

    def all(self, css: str) -> list:
        return self.driver.find_elements("css selector", css)

    def type(self, css: str, text: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(text)

    def wait(self, what, message: str):
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, WAIT, poll_frequency=0.25).until(lambda _: what())
        except Exception as exc:
            status = self.find("#status").text
            self.shot("failure")
            raise AssertionError(f"{message}; page status: {status!r}") from exc

    def log_in(self) -> None:
        """A link carries the state; the data waits for the key, which stays in the page's memory."""
        self.open("/ui?view=user")
        self.wait(lambda: "API key" in self.status(), "the page did not ask for the key")
        self.type("#api-key", API_KEY)
        self.find("#key-apply").click()
        self.wait(lambda: len(self.all("#active-users .chip")) > 0, "no most-active users")

    def status(self) -> str:
        return self.find("#status").text

    def shot(self, name: str) -> Path:
        """A full-page screenshot: the window is stretched to the page's height first."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(1400, min(max(height + 200, 900), 6000))  # the window's frame included
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        self.driver.set_window_size(1400, 1000)
        return path


def test_explorer_user_search_whatif_and_shop(browser, ui_server):  # no browser: skip before the setup
    url, ws = ui_server
    page = Page(browser, url, ws / "reports" / "ui")

    page.log_in()
    page.wait(lambda: len(page.all("#cold-users .chip")) > 0, "no coldest users")

    # Look up one of the most active users: tags with their features, families, timeline, the ranking.
    page.all("#active-users .chip")[0].click()
    user = page.find("#user-id").get_attribute("value")
    page.wait(lambda: len(page.all("#ranking tbody tr[data-item]")) == 20, "no top-20 ranking")
    assert f"user_id={user}" in browser.current_url
    tags = {t.get_attribute("data-tag"): t.text for t in page.all("#tags .tag")}
    assert {"segment", "top categories", "price band", "favourite brands", "active hours", "device",
            "recent intents"} <= set(tags)
    assert "from top_category_1_30d" in tags["top categories"] and "none yet" not in tags["top categories"]
    assert {f.get_attribute("data-family") for f in page.all("#families .family")} >= {
        "personal", "behaviour", "context", "text"}
    assert "written" in page.find("#families [data-family=text] .fresh").text
    assert len(page.all("#timeline tbody tr[data-type]")) > 0
    scores = [float(r.find_element("css selector", "td.num").text) for r in page.all("#ranking tbody tr[data-item]")]
    assert scores == sorted(scores, reverse=True)
    page.shot("user")

    # A search turns it into a personalised search ranking, and the address says so.
    page.type("#query", "camping tent")
    page.find("#search").click()
    page.wait(lambda: "camping tent" in page.find("#rank-note").text, "the ranking did not take the query")
    assert "query=camping+tent" in browser.current_url
    page.wait(lambda: len(page.all("#ranking tbody tr[data-item]")) == 20, "no search ranking")
    page.shot("search")

    # What if they buy the top item: it leaves the ranking (gone), another one enters (new).
    top = page.all("#ranking tbody tr[data-item]")[0].get_attribute("data-item")
    page.all("#ranking tbody tr[data-item] .whatif-purchase")[0].click()
    page.wait(lambda: page.find("#whatif-result").is_displayed() and "Posted" in page.status(),
              "no before/after for the purchase")
    assert page.find(f"#before li[data-item='{top}']").get_attribute("data-move") == "gone"
    assert page.all("#after li[data-move=new]"), "nothing entered the ranking after the purchase"
    assert top not in {r.get_attribute("data-item") for r in page.all("#ranking tbody tr[data-item]")}
    assert page.find("#timeline tbody tr[data-type]").get_attribute("data-type") == "purchase"

    # What if they search for something else: items move, and the moves are marked.
    page.type("#query", "")
    page.find("#search").click()
    page.wait(lambda: "Recommendations" in page.find("#rank-note").text, "the query was not cleared")
    page.type("#whatif-query", "espresso machine")
    page.find("#whatif-search").click()
    page.wait(lambda: "espresso machine" in page.find("#whatif-title").text and "Posted" in page.status(),
              "no before/after for the search")
    moves = [li.get_attribute("data-move") for li in page.all("#after li[data-move]")]
    assert len(moves) == 20 and {"up", "down", "new"} & set(moves), moves
    assert all(li.find_element("css selector", ".mark").text[:1] in "▲▼★="
               for li in page.all("#after li[data-move]"))
    assert "espresso machine" in page.find("#rank-note").text  # the session's search is the live query now
    page.shot("whatif")

    # A bad event reaches the quarantine; the shop shows its batch and the broken rule.
    bad = {"event_id": "ui-bad-rating", "user_id": user, "item_id": top, "event_type": "review", "rating": 9,
           "event_timestamp": "2026-06-29T12:00:00Z"}
    assert httpx.post(f"{url}/events", json={"events": [bad]}, headers={"X-API-Key": API_KEY},
                      timeout=60).status_code == 422

    # The shop: counts, the chart, batches with their summaries, models, freshness.
    page.find("#tab-shop").click()
    page.wait(lambda: len(page.all("#chart svg rect[data-day]")) > 0, "no events-per-day chart")
    assert "view=shop" in browser.current_url
    legend = {r.get_attribute("data-legend"): r.get_attribute("fill") for r in page.all("#chart svg rect[data-legend]")}
    assert set(EVENT_TYPES) <= set(legend) and len(set(legend.values())) == len(legend)  # a colour per declared type
    assert all(r.get_attribute("fill") == legend[r.get_attribute("data-type")]
               for r in page.all("#chart svg rect[data-day]"))
    assert len(page.all("#shop-counts .card")) >= 5
    batches = page.all("#batches tbody tr[data-batch]")
    assert batches and any(b.get_attribute("data-status") == "api" for b in batches)  # the what-if events
    page.find("#batches tr[data-quarantined='1'] .batch-link").click()
    page.wait(lambda: "rating_range" in page.find("#batch-detail").text, "no quarantined row in the batch summary")
    assert len(page.all("#reports li a")) >= 2  # the validation summary, HTML and Markdown
    assert "persona-profile:" in page.find("#models tbody").text
    assert {"user_text", "user_personal", "item_features"} <= {
        r.find_element("css selector", "td").text for r in page.all("#freshness tbody tr")}
    shop_png = page.shot("shop")
    assert shop_png.stat().st_size > 10_000 and (ws / "reports" / "ui" / "user.png").exists()


def _cjk_families() -> set[str]:
    """The families fontconfig knows with Chinese glyphs (what Chromium on Linux draws them with)."""
    listed = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True).stdout
    return {name.strip() for line in listed.splitlines() for name in line.split(",") if name.strip()}


@pytest.fixture(scope="module")
def chinese_fonts() -> set[str]:
    """The system's fonts with Chinese glyphs; none (a machine without any) skips the test, saying what
    to install. `.ci/run` installs one with Chromium, as a Chinese shop's machines have one."""
    if shutil.which("fc-list") is None or not _cjk_families():
        pytest.skip("no font with Chinese glyphs (apt-get install fonts-wqy-microhei; .ci/run does)")
    return _cjk_families()


def test_chinese_text_is_drawn_with_a_font_that_has_its_glyphs(browser, chinese_fonts, ui_server):
    """A Chinese search in the explorer: the browser draws each character with a font that holds it,
    found among the page's own font stack and the system's fonts (nothing fetched), not empty boxes."""
    url, ws = ui_server
    page = Page(browser, url, ws / "reports" / "ui")
    page.log_in()
    page.all("#active-users .chip")[1].click()
    page.wait(lambda: len(page.all("#ranking tbody tr[data-item]")) == 20, "no top-20 ranking")
    query = "落地窗帘 遮光"
    page.type("#whatif-query", query)
    page.find("#whatif-search").click()
    page.wait(lambda: query in page.find("#rank-note").text, "the Chinese search did not become the live query")
    page.shot("chinese-search")

    _assert_drawn_with_chinese_fonts(browser, page.find("#rank-note"))


def _assert_drawn_with_chinese_fonts(driver, element) -> None:
    """Every Han character of ``element`` is drawn with a system font fontconfig lists for Chinese
    (DevTools' ``CSS.getPlatformFontsForNode``), none with a web font: no empty boxes, nothing fetched."""
    driver.execute_script("arguments[0].setAttribute('data-font-probe', '1')", element)
    driver.execute_cdp_cmd("DOM.enable", {})
    driver.execute_cdp_cmd("CSS.enable", {})
    root = driver.execute_cdp_cmd("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = driver.execute_cdp_cmd("DOM.querySelector", {"nodeId": root, "selector": "[data-font-probe]"})["nodeId"]
    fonts = driver.execute_cdp_cmd("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    driver.execute_script("arguments[0].removeAttribute('data-font-probe')", element)
    hanzi = sum(1 for c in element.text if "\u4e00" <= c <= "\u9fff")
    drawn = sum(f["glyphCount"] for f in fonts if f["familyName"] in _cjk_families())
    assert drawn >= hanzi > 0, (fonts, sorted(_cjk_families()))
    assert not any(f["isCustomFont"] for f in fonts)


LONG_TITLE = "加长遮光落地窗帘" * 130  # 1,040 characters: breaks the title's 1,000-character rule


def test_data_docs_and_the_gate_summary_show_a_chinese_shop_in_its_own_script(browser, chinese_fonts, tmp_path):
    """A Chinese shop's batch with one rejected item, through `persona validate`, opened offline (every
    http(s) request blocked: GX's CDN styles and scripts never load). The gate's HTML summary shows the
    rejected title as written and links each table's Data Docs page (GX's own index lists runs only
    through CDN scripts); the items page, reached by that link, shows the title too. Both draw it with
    a font that holds its glyphs."""
    import pandas as pd

    from persona import sample_data

    shop = sample_data.generate(60, 40, 7, seed=3, locale="zh")
    bad = shop["items"].iloc[[0]].assign(item_id="zh-too-long", title=LONG_TITLE)
    shop["items"] = pd.concat([shop["items"], bad], ignore_index=True)
    sample_data.write(shop, tmp_path / "data")
    ws = tmp_path / "ws"
    done = subprocess.run([str(BIN / "persona"), "validate", "-w", str(ws), "--source", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (summary,) = (ws / "reports" / "validation").glob("*/summary.html")
    page = Page(browser, "", ws / "reports" / "ui")
    shown = f"//*[contains(text(), '{LONG_TITLE[:16]}')]"

    def title_is_shown(where: str, length: int) -> None:
        cells = browser.find_elements("xpath", shown)
        assert cells, f"{where} does not show the rejected Chinese title"
        assert LONG_TITLE[:length] in cells[0].text  # decoded as UTF-8, not replaced or escaped
        _assert_drawn_with_chinese_fonts(browser, cells[0])

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["http://*", "https://*"]})
    try:
        page.open(summary.as_uri())
        title_is_shown("the gate's summary", 40)  # its reason quotes the value's start
        page.shot("gate-summary-zh")
        links = {a.text: a for a in page.all("a")}
        assert {"index of every run", "users: this run's results", "items: this run's results",
                "events: this run's results"} <= set(links), sorted(links)
        links["items: this run's results"].click()
        page.wait(lambda: "validations/items/" in browser.current_url, "the items link did not open its page")
        title_is_shown("the items table's Data Docs page", 400)
        page.shot("data-docs-zh")
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
