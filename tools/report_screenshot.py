"""Screenshot a jcal report with headless Chromium, to check that it reads well at a normal
window size: `python tools/report_screenshot.py OUT_DIR [--png-dir DIR] [--width 1366 --height 768]`
writes DIR/screenshot.png (top of the page) and DIR/screenshot_full.png (a tall window); DIR
defaults to OUT_DIR-screenshots, beside the output: files added inside a jcal output would make it
differ from its manifest (and `--overwrite` then refuses to replace it).
Needs `chromium` (Debian: apt-get install chromium); not used by the test suite."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path


def screenshot(page: Path, png: Path, width: int, height: int) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--width", type=int, default=1366)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--full-height", type=int, default=6000)
    p.add_argument("--png-dir", type=Path, help="where the PNGs go (default: OUT_DIR-screenshots)")
    a = p.parse_args()
    png_dir = a.png_dir or a.out_dir.with_name(a.out_dir.name + "-screenshots")
    png_dir.mkdir(parents=True, exist_ok=True)
    page = a.out_dir / "report" / "index.html"
    if not page.is_file():
        from jcal.report import make_report
        page = make_report(a.out_dir)
    print(screenshot(page, png_dir / "screenshot.png", a.width, a.height))
    print(screenshot(page, png_dir / "screenshot_full.png", a.width, a.full_height))


if __name__ == "__main__":
    main()
