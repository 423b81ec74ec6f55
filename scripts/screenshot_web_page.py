"""Screenshot of the chat page with an answer, for the docs: `spatial-mllm serve` on a model folder, Debian's
headless Chromium uploads an image, asks a question and waits for the streamed answer.

    .venv/bin/python scripts/screenshot_web_page.py --model runs/demo/llava_sp_pooling/stage2 \
        --image runs/demo/world/images/test_000000.png --question "What color is the triangle?" --out docs/img/web_page.png
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--question", required=True, nargs="+", help="one or more turns, asked in order")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "spatial_mllm.cli", "serve", "--model", args.model,
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.3)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
            page = browser.new_page(viewport={"width": 860, "height": 640}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            page.set_input_files("#image-input", str(args.image))
            for turn, question in enumerate(args.question, start=1):
                page.fill("#prompt", question)
                page.click("#send")
                page.wait_for_function(
                    f"document.querySelectorAll('.message.assistant.done, .message.assistant.error').length == {turn}",
                    timeout=120_000)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            print("\n".join(page.locator(".message").all_inner_texts()))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
