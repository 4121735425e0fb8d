"""Test helper (tests only): an HTML file opened in headless Chromium (playwright, the system's chromium
binary: nothing is downloaded), every request it makes recorded and refused, what loaded checked, and a
screenshot taken."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def chromium() -> str | None:
    """The browser binary: $CHROMIUM, else the first of CANDIDATES or `chromium` on PATH that exists."""
    for c in (os.environ.get("CHROMIUM"), *CANDIDATES, shutil.which("chromium")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def render(page_file: Path, screenshot: Path | None = None, width: int = 1280) -> dict:
    """Open `page_file` from disk; returns {"requests": URLs other than the page itself (each refused),
    "images": [(src start, naturalWidth, complete)], "svgs": [(width, height)], "height": page px}."""
    from playwright.sync_api import sync_playwright

    own = Path(page_file).resolve().as_uri()
    requests: list[str] = []

    def route(r):
        if r.request.url == own:
            r.continue_()
        else:
            requests.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.route("**/*", route)
            page.on("request", lambda r: r.url != own and not r.url.startswith("data:") and requests.append(r.url))
            page.goto(own, wait_until="load")
            images = page.evaluate("""() => Array.from(document.images).map(
                i => [i.getAttribute('src').slice(0, 30), i.naturalWidth, i.complete])""")
            svgs = page.evaluate("""() => Array.from(document.querySelectorAll('svg')).map(
                s => { const r = s.getBoundingClientRect(); return [r.width, r.height]; })""")
            height = page.evaluate("() => document.documentElement.scrollHeight")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {"requests": sorted(set(requests)), "images": images, "svgs": svgs, "height": height}


def shrink(png: Path, out: Path, width: int = 1000, colors: int = 128) -> Path:
    """A screenshot made small for the docs: `width` px wide, a `colors`-colour palette."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    im = im.resize((width, round(im.height * width / im.width)), Image.Resampling.LANCZOS)
    im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    return out
