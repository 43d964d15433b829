"""Screenshots of every view of the web page, desktop and phone width, under runs/ui/.

    python scripts/ui_screenshots.py [--out runs/ui]      (make ui-screenshots)

Serves the bundled model (both versions) from a temporary copy, writes a short real
`bench http --report` into the reports folder, puts some load on the server so the dashboard
has something to draw, and drives Debian's Chromium (/usr/bin/chromium) with Playwright.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples" / "fashion"
BOOT = SAMPLES / "0000_ankle-boot.png"
SIZES = {"desktop": (1280, 900), "phone": (360, 780)}
VIEWS = ("classify", "compare", "models", "dashboard", "reports")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(repo: Path, reports: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tinyserve", "serve", "--repo", str(repo), "--port",
               str(port), "--reports-dir", str(reports), "--admin-token", "screenshot-token",
               "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not become ready in 60 s")


def load(url: str, stop: threading.Event) -> None:
    body = BOOT.read_bytes()
    with httpx.Client(base_url=url) as client:
        while not stop.is_set():
            client.post("/predict", content=body)
            time.sleep(0.004)


def fill(page: Page, view: str, bad: Path) -> None:
    if view == "classify":
        files = sorted(SAMPLES.glob("*.png"))[:5] + [bad]
        page.set_input_files("#classify-files", [str(p) for p in files])
        page.wait_for_selector("#classify-summary:has-text('classified')")
    elif view == "compare":
        page.select_option("#compare-a", "1")
        page.select_option("#compare-b", "2")
        page.set_input_files("#compare-file", str(BOOT))
        page.wait_for_selector("#compare-agreement")
    elif view == "models":
        page.wait_for_selector(".version")
    elif view == "dashboard":
        page.wait_for_timeout(8000)  # eight polls: the charts have lines
    elif view == "reports":
        page.click("#reports-list a >> nth=0")
        page.wait_for_timeout(800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ui")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo, reports = root / "repo", root / "reports"
        shutil.copytree(ROOT / "models" / "fashion-cnn", repo / "fashion-cnn")
        (repo / "fashion-cnn" / "config.toml").write_text('versions = "all"\n')
        reports.mkdir()
        bad = root / "holiday-notes.png"
        bad.write_bytes(b"these are notes, not an image")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(repo, reports, port)
        stop = threading.Event()
        try:
            subprocess.run(
                [sys.executable, "-m", "tinyserve", "bench", "http", f"{url}/predict",
                 "--image", str(BOOT), "--concurrency", "1,8", "--warmup", "0.5",
                 "--duration", "2", "--no-metrics", "--report", str(reports / "predict.html")],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            loader = threading.Thread(target=load, args=(url, stop), daemon=True)
            loader.start()
            time.sleep(1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=args.chromium, headless=True, args=["--no-sandbox"]
                )
                for scheme in ("light", "dark"):
                    for size, (width, height) in SIZES.items():
                        context = browser.new_context(
                            viewport={"width": width, "height": height},
                            color_scheme=scheme,
                            is_mobile=size == "phone",
                            device_scale_factor=1,
                        )
                        page = context.new_page()
                        for view in VIEWS if scheme == "light" else ("classify", "dashboard"):
                            page.goto(f"{url}/#{view}")
                            page.wait_for_selector("body[data-ready=true]")
                            fill(page, view, bad)
                            suffix = "" if scheme == "light" else "-dark"
                            path = args.out / f"{view}-{size}{suffix}.png"
                            page.screenshot(path=str(path), full_page=True)
                            print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
                        context.close()
                browser.close()
        finally:
            stop.set()
            server.terminate()
            server.wait(20)


if __name__ == "__main__":
    main()
