"""The OpenAI-compatible server, live: uvicorn on 127.0.0.1 serving a tiny random-init model built here, driven by
the official `openai` client (max_retries=0), raw sockets and schemathesis. Answers are compared with
`model.generate` on the same prompt and image."""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import torch

from fixtures.serving import data_url, image_bytes, live_server, tiny_served_model, user_turn
from spatial_mllm.serving.app import create_app
from spatial_mllm.serving.detokenize import IncrementalText
from spatial_mllm.serving.images import decode_image
from spatial_mllm.serving.prompts import prepare_prompt
from spatial_mllm.serving.protocol import ChatMessage
from spatial_mllm.serving.sampling import top_p_filter
from spatial_mllm.serving.settings import ServerSettings
from tiny import tiny_model

KEY = "test-key"
NAME = "tiny"
SETTINGS = ServerSettings(
    served_model_name=NAME,
    api_key=KEY,
    max_batch_size=8,
    max_queue=16,
    max_request_bytes=400_000,
    max_image_bytes=100_000,
    max_image_pixels=300 * 300,
    limit_images=1,
    max_model_len=512,
    allowed_media_domains=("127.0.0.1",),
)
RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (30, 40, 220)


@pytest.fixture(scope="module")
def served():
    model, processor = tiny_served_model()
    app = create_app(model, processor, SETTINGS)
    with live_server(app) as url:
        yield url, model, processor, app.state.engine


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(model, processor, messages: list[dict], max_new_tokens: int) -> dict:
    """What `model.generate` (greedy) answers to OpenAI-style `messages`, computed without the server."""
    images, converted = [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    url = part["image_url"]["url"]
                    images.append(decode_image(base64.b64decode(url.split(",", 1)[1]), ServerSettings(), "x"))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            content = parts
        converted.append({"role": message["role"], "content": content})
    prompt = processor.apply_chat_template(converted, add_generation_prompt=True)
    inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                suppress_tokens=[processor.image_token_id])
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    finish = "stop" if eos in new else "length"
    new = new[: new.index(eos) + 1] if eos in new else new
    return {
        "text": processor.decode(new, skip_special_tokens=True),
        "prompt_tokens": inputs["input_ids"].shape[1],
        "image_tokens": int((inputs["input_ids"] == processor.image_token_id).sum()),
        "completion_tokens": len(new),
        "finish_reason": finish,
    }


def raw_request(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
    """One HTTP/1.0 exchange on a plain socket: status, headers, and the body bytes exactly as sent."""
    parts = urlsplit(url)
    head = {"Host": parts.netloc, "Content-Length": str(len(body)), "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json", **(headers or {})}
    request = f"{method} {path} HTTP/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    response_headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, response_headers, payload


def sse_events(payload: bytes) -> list:
    """The data of each `data: ...\\n\\n` event; fails unless the whole payload is exactly such events."""
    assert re.fullmatch(rb"(data: [^\n]+\n\n)+", payload), payload[:300]
    return [event[len(b"data: "):].decode() for event in payload.split(b"\n\n")[:-1]]


# --- answers ----------------------------------------------------------------------------------------------------
def test_models_and_health(served, client):
    url, model, processor, engine = served
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(url + "/health").json()
    assert health == {"status": "ok", "running": 0, "waiting": 0}


def test_answer_with_an_image_equals_generate(served, client):
    url, model, processor, engine = served
    messages = [user_turn("what color is the circle ?", image_bytes(RED))]
    expected = reference(model, processor, messages, 12)
    assert expected["image_tokens"] == processor.num_image_tokens == 144
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    assert answer.object == "chat.completion" and answer.model == NAME and answer.id.startswith("chatcmpl-")
    assert [c.index for c in answer.choices] == [0]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected["text"] and expected["text"].strip()
    assert answer.choices[0].finish_reason == expected["finish_reason"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]  # the 144 image tokens included
    assert answer.usage.completion_tokens == expected["completion_tokens"]
    assert answer.usage.total_tokens == expected["prompt_tokens"] + expected["completion_tokens"]

    # The image matters: another colour, another answer; both equal generate.
    other = [user_turn("what color is the circle ?", image_bytes(BLUE))]
    other_expected = reference(model, processor, other, 12)
    assert other_expected["text"] != expected["text"]
    assert client.chat.completions.create(model=NAME, messages=other, max_tokens=12).choices[0].message.content \
        == other_expected["text"]


def test_streamed_answer_equals_generate_and_counts_usage(served, client):
    url, model, processor, engine = served
    messages = [user_turn("where is the square ?", image_bytes(GREEN))]
    expected = reference(model, processor, messages, 10)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2  # streamed piece by piece
    assert "".join(content) == expected["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected["finish_reason"]]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == expected["completion_tokens"]
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_bytes_on_the_socket(served):
    url, model, processor, engine = served
    messages = [user_turn("what shape is red ?", image_bytes(RED))]
    expected = reference(model, processor, messages, 6)
    body = json.dumps({"model": NAME, "messages": messages, "max_tokens": 6, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    status, headers, payload = raw_request(url, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(payload)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(", " not in e and ": " not in e for e in events[:-1] if '"content"' not in e)  # compact JSON
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    first, *middle, finish, usage = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
               for c in middle)
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == expected["text"]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == expected["finish_reason"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": expected["prompt_tokens"], "completion_tokens": expected["completion_tokens"],
        "total_tokens": expected["prompt_tokens"] + expected["completion_tokens"]}

    # Without include_usage the chunks carry no usage at all.
    body = json.dumps({"messages": messages, "max_tokens": 3, "stream": True}).encode()
    events = sse_events(raw_request(url, "POST", "/v1/chat/completions", body)[2])
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])


def test_n_choices_and_seeds(served, client):
    url, model, processor, engine = served
    messages = [user_turn("what is there ?", image_bytes(BLUE))]

    def ask(seed, n=3):
        answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=1.0, n=n,
                                                seed=seed)
        return answer, [c.message.content for c in answer.choices]

    answer, texts = ask(seed=5)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # the choices sample independently
    assert ask(seed=5)[1] == texts  # same seed, same answers
    assert ask(seed=6)[1] != texts
    greedy = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, n=2)
    expected = reference(model, processor, messages, 8)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content == expected["text"]
    assert greedy.usage.prompt_tokens == expected["prompt_tokens"]  # the prompt counts once
    assert greedy.usage.completion_tokens == 2 * expected["completion_tokens"]

    # Streamed, each choice gets its role chunk, its content and its finish.
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=1.0,
                                                 n=3, seed=5, stream=True))
    for index in range(3):
        own = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert own[0].delta.role == "assistant" and own[-1].finish_reason in ("stop", "length")
        assert "".join(c.delta.content or "" for c in own) == texts[index]


def test_stop_strings(served, client):
    url, model, processor, engine = served
    messages = [user_turn("what color is the circle ?", image_bytes(RED))]
    full = reference(model, processor, messages, 12)["text"]
    words = full.split()
    stop = " " + words[2]  # a string that starts in the middle of the answer
    cut = full[: full.index(stop)]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stop=[stop, "zzz"])
    assert answer.choices[0].message.content == cut and answer.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, stop=stop,
                                                   stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_requests_that_arrive_together_are_generated_together(served, client):
    url, model, processor, engine = served
    colours = [RED, GREEN, BLUE, (200, 200, 30)]
    asks = [[user_turn("what color is the circle ?", image_bytes(c))] for c in colours]
    limits = [4, 6, 8, 10]
    expected = [reference(model, processor, m, k)["text"] for m, k in zip(asks, limits)]
    results: dict[int, str] = {}
    steps_before = engine.steps

    def ask(i):
        results[i] = client.chat.completions.create(model=NAME, messages=asks[i], max_tokens=limits[i]) \
            .choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(4)] == expected  # batched answers are each request's own answer
    # One at a time would take sum(limits) - 4 = 24 decode steps; together they take about max(limits).
    assert engine.steps - steps_before < sum(limits) - 4


def test_a_finished_request_leaves_while_others_run(served, client):
    url, model, processor, engine = served
    long = client.chat.completions.create(model=NAME, messages=[user_turn("what is there ?")], max_tokens=400,
                                          stream=True, extra_body={"ignore_eos": True})
    next(iter(long))  # the long answer is under way
    short = client.chat.completions.create(model=NAME, messages=[user_turn("what color ?")], max_tokens=2)
    assert short.usage.completion_tokens <= 2
    assert httpx.get(url + "/health").json()["running"] == 1  # the long one is still generating
    long.close()
    wait_until(lambda: httpx.get(url + "/health").json()["running"] == 0)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_client_that_disconnects_stops_its_generation(served):
    url, model, processor, engine = served
    for stream in (True, False):
        body = json.dumps({"messages": [user_turn("what is there ?")], "max_tokens": 450, "ignore_eos": True,
                           "stream": stream}).encode()
        parts = urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port))
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n")
        started = engine.steps
        sock.sendall(head.encode() + body)
        wait_until(lambda: engine.running == 1)
        sock.close()
        wait_until(lambda: engine.running == 0)
        assert engine.steps - started < 400  # stopped long before its 450 tokens


# --- errors -----------------------------------------------------------------------------------------------------
def post(url: str, payload, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(url + "/v1/chat/completions", content=raw,
                          headers={**headers, "Content-Type": "application/json"}, timeout=60)
    return httpx.post(url + "/v1/chat/completions", json=payload, headers=headers, timeout=60)


def image_message(url: str, text: str = "what color ?") -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def assert_envelope(response: httpx.Response, status: int, param: str | None = None, says: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert len(error["message"]) <= 1000 and says.lower() in error["message"].lower(), error
    if param is not None:
        assert error["param"] == param, error
    return error


def png_of(size) -> bytes:
    return image_bytes(RED, size)


BAD_REQUESTS = {
    "no messages": ({"model": NAME}, 400, "messages", "messages"),
    "empty messages": ({"messages": []}, 400, "messages", "at least 1"),
    "wrong type": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens", ""),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", ""),
    "bad base64": ({"messages": [image_message("data:image/png;base64,@@@@")]}, 400,
                   "messages.0.content.0.image_url", "base64"),
    "not an image": ({"messages": [image_message(data_url(b"plain text, not a picture"))]}, 400,
                     "messages.0.content.0.image_url", "not an image"),
    "text data url": ({"messages": [image_message("data:text/plain;base64,aGk=")]}, 400,
                      "messages.0.content.0.image_url", "image/*"),
    "server path": ({"messages": [image_message("/etc/passwd")]}, 400, "messages.0.content.0.image_url", "never read"),
    "file url": ({"messages": [image_message("file:///etc/passwd")]}, 400, "messages.0.content.0.image_url", ""),
    "too many images": ({"messages": [image_message(data_url(png_of((8, 8)))), image_message(data_url(png_of((8, 8))))]},
                        400, "messages", "at most 1 image"),
    "image in a system message": ({"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_of((8, 8)))}}]}, {"role": "user", "content": "hi"}]},
        400, "messages.0.content.0", "user messages only"),
    "image token in text": ({"messages": [{"role": "user", "content": "look <image> here"}]}, 400,
                            "messages.0.content", "<image>"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "red " * 600}]}, 400, "messages",
                                "maximum context length"),
    "answer over the context": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, 400,
                                "max_tokens", "maximum context length"),
    "stream options without stream": ({"messages": [{"role": "user", "content": "hi"}],
                                       "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    "tools": ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function",
                                                                        "function": {"name": "f"}}]}, 400, "tools", ""),
    "n over the cap": ({"messages": [{"role": "user", "content": "hi"}], "n": 50}, 400, "n", ""),
    "template refuses": ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}, 400,
                         "messages", "chat template"),
    "remote host not allowed": ({"messages": [image_message("http://localhost:1/x.png")]}, 400,
                                "messages.0.content.0.image_url", "allowed-media-domains"),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model",
                      "does not exist"),
    "image over its byte cap": ({"messages": [image_message(data_url(os.urandom(150_000)))]}, 413,
                                "messages.0.content.0.image_url", "limit"),
    "image over its pixel cap": ({"messages": [image_message(data_url(png_of((400, 400))))]}, 413,
                                 "messages.0.content.0.image_url", "400x400"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_the_error_envelope(served, case):
    payload, status, param, says = BAD_REQUESTS[case]
    assert_envelope(post(served[0], payload), status, param, says)


def test_errors_of_the_transport(served, client):
    url = served[0]
    assert_envelope(post(url, None, raw=b'{"messages": [oops'), 400, None, "json")
    assert_envelope(post(url, {"messages": [{"role": "user", "content": "hi"}]}, key=None), 401, None, "missing")
    assert_envelope(post(url, {"messages": [{"role": "user", "content": "hi"}]}, key="wrong"), 401, None, "invalid")
    assert_envelope(httpx.get(url + "/v1/models"), 401)
    assert httpx.get(url + "/health").status_code == 200  # health stays open, as in vLLM
    assert_envelope(httpx.get(url + "/v2/anything"), 404, None, "no route")
    assert_envelope(httpx.get(url + "/v1/models/other", headers={"Authorization": f"Bearer {KEY}"}), 404, "model")
    # Body over the cap: refused from its Content-Length, before it is read.
    status, headers, payload = raw_request(url, "POST", "/v1/chat/completions", b"x" * 500_000)
    assert status == 413 and json.loads(payload)["error"]["code"] == 413
    # ... and, without a Content-Length, while it streams in.
    chunked = httpx.post(url + "/v1/chat/completions", content=iter([b"{" + b" " * 300_000, b" " * 300_000]),
                         headers={"Authorization": f"Bearer {KEY}"})
    assert_envelope(chunked, 413, None, "body")
    # The official client sees each as its documented exception class.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_an_error_after_the_stream_started_is_an_sse_event(served, client, monkeypatch):
    url, model, processor, engine = served
    forward = model.language_model.forward
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated device failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.language_model, "forward", failing)
    body = json.dumps({"messages": [user_turn("what is there ?")], "max_tokens": 10, "stream": True}).encode()
    status, headers, payload = raw_request(url, "POST", "/v1/chat/completions", body)
    events = sse_events(payload)
    assert status == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 500 and "simulated device failure" in error["message"]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    # The client raises on it; the engine goes on serving.
    calls["n"] = 0
    with pytest.raises(openai.APIError, match="simulated device failure"):
        list(client.chat.completions.create(model=NAME, messages=[user_turn("hi")], max_tokens=10, stream=True))
    calls["n"] = -10**6
    non_streamed = post(url, {"messages": [user_turn("hi")], "max_tokens": 3})
    assert non_streamed.status_code == 200 and non_streamed.json()["usage"]["completion_tokens"] <= 3


# --- remote images ----------------------------------------------------------------------------------------------
@contextmanager
def image_host():
    png = image_bytes(GREEN)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/green.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "/green.png")
                self.end_headers()
            elif self.path == "/huge.png":
                self.send_response(200)
                self.send_header("Content-Length", str(5_000_000))
                self.end_headers()
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_remote_images_only_from_allowed_hosts_without_redirects(served):
    url, model, processor, engine = served
    with image_host() as host:
        same_as_inline = post(url, {"messages": [image_message(data_url(image_bytes(GREEN)))], "max_tokens": 6})
        fetched = post(url, {"messages": [image_message(f"{host}/green.png")], "max_tokens": 6})
        assert fetched.status_code == 200
        assert fetched.json()["choices"][0]["message"]["content"] == \
            same_as_inline.json()["choices"][0]["message"]["content"]
        # Ollama's shape: the URL as a bare string.
        bare = post(url, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": f"{host}/green.png"}, {"type": "text", "text": "what color ?"}]}],
            "max_tokens": 6})
        assert bare.json()["choices"][0]["message"]["content"] == fetched.json()["choices"][0]["message"]["content"]
        assert_envelope(post(url, {"messages": [image_message(f"{host}/moved.png")]}), 400, None, "redirect")
        assert_envelope(post(url, {"messages": [image_message(f"{host}/huge.png")]}), 413, None, "limit")
        assert_envelope(post(url, {"messages": [image_message(f"{host}/missing.png")]}), 400, None, "404")


# --- load -------------------------------------------------------------------------------------------------------
def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def test_a_burst_is_refused_with_503_and_memory_stays_bounded():
    model, processor = tiny_served_model()
    settings = ServerSettings(served_model_name=NAME, max_queue=8, max_batch_size=4, max_model_len=512)
    app = create_app(model, processor, settings)
    engine = app.state.engine
    payload = {"messages": [user_turn("what color ?", image_bytes(RED))], "max_tokens": 4}
    most_waiting = 0

    async def burst(count: int) -> list[httpx.Response]:
        nonlocal most_waiting
        limits = httpx.Limits(max_connections=count)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            async def one():
                return await http.post("/v1/chat/completions", json=payload)

            tasks = [asyncio.create_task(one()) for _ in range(count)]
            while not all(t.done() for t in tasks):
                most_waiting = max(most_waiting, engine.waiting)
                await asyncio.sleep(0.005)
            return [t.result() for t in tasks]

    with live_server(app) as url:
        first = asyncio.run(burst(200))
        after_first = rss_mib()
        second = asyncio.run(burst(200))
        after_second = rss_mib()
        assert httpx.get(url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
    for responses in (first, second):
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= 8
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert_envelope(refused, 503, None, "busy")
    assert most_waiting <= settings.max_queue
    assert after_second - after_first < 64, (after_first, after_second)  # a second burst does not grow memory


# --- schema fuzzing ---------------------------------------------------------------------------------------------
def test_fuzzing_the_openapi_schema_finds_no_server_error(served):
    import hypothesis
    import schemathesis
    from schemathesis import GenerationMode

    url = served[0]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures, statuses = [], []

    def check(case) -> None:
        if isinstance(case.body, dict) and "messages" in case.body:
            case.body["max_tokens"] = 2  # bounded work per example
            case.body.pop("max_completion_tokens", None)
        response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        statuses.append(response.status_code)
        if response.status_code >= 500:
            failures.append((case.operation.label, case.body, response.status_code, response.text[:300]))
        elif response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code

    for result in schema.get_all_operations():
        operation = result.ok()
        # Negative cases (requests that break the schema) exist only where there is a body to break.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            hypothesis.settings(max_examples=20, deadline=None, database=None, derandomize=True,
                                suppress_health_check=list(hypothesis.HealthCheck))(
                hypothesis.given(case=operation.as_strategy(generation_mode=mode))(check))()
    assert not failures, failures[:3]
    assert 200 in statuses and 400 in statuses  # both valid and invalid requests were made


# --- pieces -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projector", ["mlp2x_gelu", "llava_sp_pooling", "saep"])
def test_prompt_tokens_count_each_projectors_image_tokens(projector):
    options = {"spatial_width": 8} if projector.startswith("llava_sp") else {}
    model, processor = tiny_model(projector, **options)
    settings = ServerSettings()
    with_image = prepare_prompt(processor, [ChatMessage(**user_turn("what color ?", image_bytes()))], settings, 4096)
    text_only = prepare_prompt(processor, [ChatMessage(**user_turn("what color ?"))], settings, 4096)
    # 12x12 ViT grid: 144 MLP tokens; LLaVA-SP adds its 6 spatial tokens (582 = 576 + 6 at 24x24); SAEP pools 4:1.
    expected = {"mlp2x_gelu": 144, "llava_sp_pooling": 150, "saep": 36}[projector]
    assert model.num_image_tokens == expected
    assert len(with_image.input_ids) - len(text_only.input_ids) == expected
    assert with_image.pixel_values.shape[0] == 1 and text_only.pixel_values is None


def test_incremental_text_holds_back_a_possible_stop_string():
    _, processor = tiny_model()
    tokenizer = processor.tokenizer
    ids = tokenizer("red circle above blue square", add_special_tokens=False)["input_ids"]
    stream = IncrementalText(tokenizer, stop=("blue sq",))
    pieces = [stream.add(i) for i in ids]
    # "blue" could begin the stop string, so it is held back; "square" completes it, and nothing of it is sent.
    assert pieces == ["red", " circle", " above", " ", ""] and stream.stopped
    assert stream.flush() == ""
    stream = IncrementalText(tokenizer, stop=("blue green",))
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) + stream.flush() == "red circle above blue square" and not stream.stopped


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = top_p_filter(logits, torch.tensor([0.75, 0.9])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, True, True, True]]
    assert top_p_filter(logits, torch.tensor([0.1, 1.0])).isfinite().sum(-1).tolist() == [1, 4]


def test_a_request_that_fails_in_prefill_leaves_the_running_batch_alone(served, client, monkeypatch):
    url, model, processor, engine = served
    long = client.chat.completions.create(model=NAME, messages=[user_turn("what is there ?")], max_tokens=300,
                                          stream=True, extra_body={"ignore_eos": True})
    first = next(iter(long))
    assert first.choices[0].delta.role == "assistant"
    tower = model.vision_tower.forward

    def broken(*args, **kwargs):
        raise RuntimeError("simulated vision tower failure")

    monkeypatch.setattr(model.vision_tower, "forward", broken)
    failing = post(url, {"messages": [user_turn("what color ?", image_bytes(RED))], "max_tokens": 3})
    assert_envelope(failing, 500, None, "simulated vision tower failure")
    monkeypatch.setattr(model.vision_tower, "forward", tower)
    rest = list(long)
    assert rest[-1].choices[0].finish_reason == "length"  # the long answer ran to its end, unharmed
