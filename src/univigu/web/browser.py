"""Driving the demo page in a real headless Chromium (selenium), for its test and its benchmark.

Debian's `chromium` and `chromium-driver` packages are used (`.ci/run` installs them); nothing is
downloaded. `UNIVIGU_CHROMIUM` / `UNIVIGU_CHROMEDRIVER` point elsewhere. The browser starts with a
fresh profile and with its background traffic off, so every request it makes comes from the page.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                  "--disable-default-apps", "--mute-audio", "--autoplay-policy=no-user-gesture-required")


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) executables, or None when either is missing."""
    browser = os.environ.get("UNIVIGU_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    driver = os.environ.get("UNIVIGU_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if Path(browser).is_file() and Path(driver).is_file():
        return browser, driver
    return None


def start_chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium under selenium with a fresh profile (removed by `quit`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise FileNotFoundError("Chromium not found: apt-get install chromium chromium-driver "
                                "(or set UNIVIGU_CHROMIUM / UNIVIGU_CHROMEDRIVER)")
    browser, driver_path = found
    profile = tempfile.mkdtemp(prefix="univigu-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    quit_driver = driver.quit

    def quit_and_clean():
        try:
            quit_driver()
        finally:
            shutil.rmtree(profile, ignore_errors=True)

    driver.quit = quit_and_clean
    return driver


class DemoPage:
    """The three tabs of the page, as a person uses them."""

    def __init__(self, driver, url: str, timeout: float = 60):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url, self.timeout = driver, url, timeout
        self.wait = WebDriverWait(driver, timeout, poll_frequency=0.1)
        self.requested: list[str] = []

    # ------------------------------------------------------------------ basics
    def _css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def _all(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def _value(self, selector: str) -> str:
        return self._css(selector).get_attribute("value") or ""

    def open(self) -> "DemoPage":
        self.driver.get(self.url)
        self.wait.until(lambda d: self._all("#t2v-prompt textarea"))
        return self

    def tab(self, label: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.XPATH, f"//button[@role='tab' and contains(., '{label}')]").click()
        time.sleep(0.3)

    def type_prompt(self, elem_id: str, text: str) -> None:
        box = self._css(f"#{elem_id} textarea")
        box.clear()
        box.send_keys(text)

    def video_info(self, elem_id: str, old_src: str | None = None) -> dict:
        """Wait until the video in `elem_id` (a new one, when `old_src` is given) has loaded its
        metadata and plays; its duration, size, source, and how far it has played."""
        script = f"""const v = document.querySelector('#{elem_id} video');
            if (!v || v.readyState < 1 || !(v.duration > 0)) return null;
            return {{duration: v.duration, width: v.videoWidth, height: v.videoHeight, src: v.currentSrc,
                     error: v.error ? v.error.code : null, time: v.currentTime, paused: v.paused}};"""

        def ready(d):
            info = d.execute_script(script)
            return info if info and info["src"] != old_src else None

        info = self.wait.until(ready)
        if info["error"] is None:
            # Playing: the clock moves (the page autoplays, muted, in a loop). The element may be
            # re-rendered meanwhile, so each poll reads it afresh.
            start = info["time"]

            def moved(d):
                now = ready(d)
                return now if now and (now["time"] != start or now["error"] is not None) else None

            info = self.wait.until(moved)
            info["played"] = info["error"] is None
        return info

    def current_src(self, elem_id: str) -> str | None:
        return self.driver.execute_script(f"const v = document.querySelector('#{elem_id} video'); "
                                          "return v ? v.currentSrc : null;")

    def wait_text(self, selector: str, old: str = "") -> str:
        return self.wait.until(lambda d: (v := self._value(selector)) and v != old and v)

    def errors(self) -> list[str]:
        return [e.text for e in self._all(".toast-body")]

    def wait_error(self, contains: str) -> str:
        return self.wait.until(lambda d: next((t for t in self.errors() if contains in t), None))

    def close_errors(self) -> None:
        for button in self._all(".toast-close"):
            try:
                button.click()
            except Exception:  # noqa: BLE001 - already gone
                pass

    # ------------------------------------------------------------------ the tabs
    def text_to_video(self, prompt: str) -> dict:
        self.tab("Text to video")
        self.type_prompt("t2v-prompt", prompt)
        old = self.current_src("t2v-video")
        start = time.perf_counter()
        self._css("#t2v-run").click()
        info = self.video_info("t2v-video", old)
        info["seconds"] = time.perf_counter() - start
        captions = self._all("#t2v-caption textarea")
        info["caption"] = self.wait_text("#t2v-caption textarea") if captions else ""
        info["oracle"] = self._css("#t2v-oracle").text
        return info

    def upload(self, path: str | Path) -> None:
        self.tab("Video to text")
        self._css("#v2t-video input[type=file]").send_keys(str(Path(path).resolve()))
        # Gradio shows the upload once it is on the server.
        self.wait.until(lambda d: self._all("#v2t-video video"))

    def caption(self) -> dict:
        old = self._value("#v2t-caption textarea")
        start = time.perf_counter()
        self._css("#v2t-run").click()
        caption = self.wait_text("#v2t-caption textarea", old)
        # The table is filled with the caption; its kept row marks it done.
        rows = self.wait.until(lambda d: (rows := [r.text for r in self._all("#v2t-candidates .virtual-row")])
                               and any("kept" in r for r in rows) and rows)
        return {"caption": caption, "candidates": rows, "oracle": self._css("#v2t-oracle").text,
                "seconds": time.perf_counter() - start}

    def pick_example(self, index: int) -> dict:
        self.tab("Video to text")
        old = self.current_src("v2t-video")
        self._css("#v2t-example input").click()
        options = self.wait.until(lambda d: self._all("#v2t-example li[data-testid=dropdown-option]") or None)
        options[index].click()
        return self.video_info("v2t-video", old)

    def joint(self, prompt: str) -> dict:
        self.tab("Joint")
        self.type_prompt("joint-prompt", prompt)
        old = self.current_src("joint-video")
        start = time.perf_counter()
        self._css("#joint-run").click()
        first_step = self.wait.until(lambda d: (v := self._value("#joint-canvas textarea")).startswith("step ")
                                     and v)
        first_step_seconds = time.perf_counter() - start
        info = self.video_info("joint-video", old)
        info["seconds"] = time.perf_counter() - start
        info["first_step_seconds"] = first_step_seconds
        info["first_step"] = first_step
        info["caption"] = self.wait_text("#joint-caption textarea")
        info["canvas"] = self._value("#joint-canvas textarea")
        info["oracle"] = self._css("#joint-oracle").text
        return info

    def set_joint_step(self, step: int) -> str:
        """Move the step slider (its number box) and return the text shown for that step."""
        from selenium.webdriver.common.keys import Keys

        box = self._css("#joint-step input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(step), Keys.ENTER)
        return self.wait.until(lambda d: (v := self._value("#joint-canvas textarea")).startswith(f"step {step} ")
                               and v)

    # ------------------------------------------------------------------ what left the machine
    def external_requests(self) -> list[str]:
        """URLs the page asked for from any host but the server's (since the last call)."""
        host = urlparse(self.url).hostname
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])
        return [u for u in self.requested
                if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).hostname != host]
