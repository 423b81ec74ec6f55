"""The two human front ends, end to end: the web page in Debian's headless Chromium against `spatial-mllm serve`
(a real subprocess on 127.0.0.1), and `spatial-mllm chat` in a pseudo-terminal. Answers are compared with
`model.generate` on the same conversation, computed here from the same saved folder."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from fixtures.serving import free_port, save_served_model
from spatial_mllm.model.loading import load_for_inference
from spatial_mllm.serving.chat import ChatSession

CHROMIUM = "/usr/bin/chromium"
RED, BLUE = (220, 30, 30), (30, 40, 220)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(model_dir)


def picture(folder: Path, name: str, colour) -> Path:
    path = folder / name
    Image.new("RGB", (40, 30), colour).save(path)
    return path


def generate(model, processor, messages: list[dict], images: list, max_new_tokens: int) -> dict:
    """Greedy `model.generate` on transformers-style messages: the reference both front ends must match."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                suppress_tokens=[processor.image_token_id])
    new = output[0, inputs["input_ids"].shape[1]:]
    eos = processor.tokenizer.eos_token_id
    return {"text": processor.decode(new, skip_special_tokens=True).strip(),
            "prompt_tokens": inputs["input_ids"].shape[1],
            "completion_tokens": int(new.tolist().index(eos) + 1 if eos in new.tolist() else len(new))}


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TERM": "dumb"}


# --- the web page in a real browser -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir):
    """`spatial-mllm serve` as a user starts it, on a free loopback port."""
    port = free_port()
    command = [sys.executable, "-m", "spatial_mllm.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", "tiny", "--max-model-len", "512"]
    process = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"spatial-mllm serve did not start:\n{process.stdout.read()}")
        time.sleep(0.2)
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def test_the_web_page_streams_an_answer_about_an_uploaded_image(server, loaded, tmp_path):
    from playwright.sync_api import sync_playwright

    assert shutil.which("chromium") == CHROMIUM, (
        "the web-page test drives Debian's Chromium: ./scripts/setup.sh installs it as root, or "
        "`sudo apt-get install -y chromium`")
    model, processor = loaded
    red = picture(tmp_path, "red.png", RED)
    question, follow_up = "what color is the circle ?", "where is the square ?"
    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    first = generate(model, processor, first_turn, [Image.open(red).convert("RGB")], 8)
    second = generate(model, processor, first_turn + [{"role": "assistant", "content": first["text"]},
                                                      {"role": "user", "content": follow_up}],
                      [Image.open(red).convert("RGB")], 8)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').options.length > 0")
            assert page.input_value("#model") == "tiny"
            page.click("summary")  # open the settings, as a user would, to shorten the answers
            page.fill("#max-tokens", "8")
            page.set_input_files("#image-input", str(red))
            page.wait_for_selector("#preview img[src^='data:image/png;base64,']")
            # Record every text the answer shows while it streams.
            page.evaluate("""() => {
                window.seen = [];
                new MutationObserver(() => {
                    const answers = document.querySelectorAll('.message.assistant .text');
                    if (answers.length) window.seen.push(answers[answers.length - 1].textContent);
                }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
            }""")
            page.fill("#prompt", question)
            page.click("#send")
            page.wait_for_selector(".message.assistant.done", timeout=60_000)
            answer = page.locator(".message.assistant.done .text").inner_text()
            assert answer.strip() == first["text"] and first["text"]
            shown = [text for text in page.evaluate("window.seen") if text]
            assert len(set(shown)) >= 2 and all(answer.startswith(text) for text in shown)  # it grew piece by piece
            usage = page.locator(".message.assistant.done .usage").inner_text()
            assert usage.startswith(f"{first['prompt_tokens']} prompt tokens") and \
                f"{first['completion_tokens']} answer tokens" in usage
            assert page.locator(".message.user img").count() == 1  # the user sees the image they sent

            # Second turn, no new image: the page sends the whole history.
            page.fill("#prompt", follow_up)
            page.press("#prompt", "Enter")
            page.wait_for_function("document.querySelectorAll('.message.assistant.done').length == 2",
                                   timeout=60_000)
            assert page.locator(".message.assistant.done .text").nth(1).inner_text().strip() == second["text"]

            # A second image is over the server's limit: the page shows the server's own words.
            page.set_input_files("#image-input", str(picture(tmp_path, "blue.png", BLUE)))
            page.wait_for_selector("#preview img[src^='data:image/png;base64,']")
            page.fill("#prompt", "and this one ?")
            page.click("#send")
            error = page.wait_for_selector(".message.assistant.error", timeout=60_000).inner_text()
            assert error.startswith("400: At most 1 image(s) may be provided in one prompt")
            page.screenshot(path=str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").stat().st_size > 5000
        finally:
            browser.close()


# --- the terminal chat ------------------------------------------------------------------------------------------
class Terminal:
    """A child process on a pseudo-terminal: what it prints, as a person would see it."""

    def __init__(self, command: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvpe(command[0], command, child_env())
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 120) -> str:
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while marker not in self.seen[start:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} did not appear; the terminal shows:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b""
                if not data:
                    raise AssertionError(f"the chat ended before {marker!r}:\n{self.seen[-2000:]}")
                self.seen += data.decode(errors="replace").replace("\r\n", "\n")
        end = self.seen.index(marker, start) + len(marker)
        return self.seen[start:end]

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def wait(self, timeout: float = 30) -> int | None:
        """The exit code, or None (and the child killed) if it did not end in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        return None

    def close(self) -> None:
        os.close(self.fd)


def test_chat_in_a_terminal_two_turns_with_an_image(model_dir, loaded, tmp_path):
    model, processor = loaded
    red = picture(tmp_path, "red.png", RED)
    image = Image.open(red).convert("RGB")
    question, follow_up = "what color is the circle ?", "where is it ?"
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    first = generate(model, processor, turn, [image], 10)["text"]
    second = generate(model, processor, turn + [{"role": "assistant", "content": first},
                                                {"role": "user", "content": follow_up}], [image], 10)["text"]

    chat = Terminal([sys.executable, "-m", "spatial_mllm.cli", "chat", "--model", str(model_dir), "--image", str(red),
                     "--max-new-tokens", "10"])
    try:
        assert "attached to the next turn" in chat.read_until("you> ")
        chat.type(question)
        shown = chat.read_until("you> ")
        assert shown.split("assistant> ", 1)[1].rsplit("you> ", 1)[0].strip() == first
        chat.type("/image /no/such/picture.png")
        assert "cannot attach /no/such/picture.png: no such file" in chat.read_until("you> ")
        chat.type(follow_up)  # the chat went on, with the first image still in the conversation
        shown = chat.read_until("you> ")
        assert shown.split("assistant> ", 1)[1].rsplit("you> ", 1)[0].strip() == second
        chat.type("/quit")
        assert chat.wait() == 0
    finally:
        chat.close()


def test_chat_session_streams_token_by_token_and_resets(loaded, tmp_path):
    from transformers import TextStreamer

    model, processor = loaded

    class Recording(TextStreamer):
        def __init__(self):
            super().__init__(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.pieces = []

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.pieces.append(text)

    session = ChatSession(model, processor, max_new_tokens=10)
    session.attach(picture(tmp_path, "red.png", RED))
    streamer = Recording()
    answer = session.reply("what color is the circle ?", streamer)
    assert len([p for p in streamer.pieces if p.strip()]) >= 2  # shown word by word, not at the end
    assert "".join(streamer.pieces).strip() == answer
    assert len(session.messages) == 2 and len(session.images) == 1 and session.pending is None
    with pytest.raises(ValueError, match="not a readable image"):
        session.attach(Path(__file__))
    session.reset()
    assert session.messages == [] and session.images == []
