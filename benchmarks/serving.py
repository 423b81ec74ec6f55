"""Serving benchmark: does batching pay? Requests/s, time to first token and per-token latency of `spatial-mllm serve`
with N concurrent requests, against the same requests sent one after another; and memory under a refused burst.

    .venv/bin/python benchmarks/serving.py [--model DIR] [--concurrency 1 4 16] [--max-tokens 64] [--repeats 3]
        [--burst 200] [--burst-queue 8] [--out runs/bench/serving.json]

The server is a real `spatial-mllm serve` subprocess on 127.0.0.1 (loopback only); the client streams every answer
(httpx) and times its events. Every request carries an image (one of four colours) and asks for exactly
--max-tokens tokens (`ignore_eos`), so every setting does the same work. Without --model, a small random-init model
(CLIP-style ViT 96 px / 12 px patches, llava_sp_pooling, a 4-layer 256-wide Llama, a byte-level BPE tokenizer) is
built and saved in a temporary folder.

Settings, in each repeat: "sequential" (--concurrency's largest N sent one after another), then "concurrent N" for each
N. The ratio sequential / concurrent-largest of total seconds is reported per repeat (the machine is noisy; the
settings run side by side so each ratio compares like with like; the order alternates between repeats), both in
wall seconds and in the server process's CPU seconds, which other load on the machine disturbs less. Percentiles are over all requests of a setting in
all repeats. Burst: a second server with --burst-queue waiting slots and a batch of 4 gets --burst requests at once,
twice; refused requests must be 503, and the server's resident memory after the second burst is compared with after
the first. Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (220, 200, 30)]
QUESTION = "What color is the circle, and where is it?"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_small_model(folder: Path) -> Path:
    """A random-init model saved to `folder`: big enough that a decode step is real work, small enough for a CPU."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    from spatial_mllm.demo.tokenizer import train_world_tokenizer
    from spatial_mllm.model import build_model

    words = "red green blue yellow circle square triangle left right above below top bottom center small large".split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    tokenizer = train_world_tokenizer(texts, folder / "tokenizer", vocab_size=1024)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              image_size=96, patch_size=12)
    llm = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model, processor = build_model(vision, llm, tokenizer, "llava_sp_pooling", {"spatial_width": 64})
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


class Server:
    """`spatial-mllm serve` in a subprocess, until the `with` block ends."""

    def __init__(self, model: Path, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "spatial_mllm.cli", "serve", "--model", str(model), "--port", str(self.port),
                   "--served-model-name", "bench", *options]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "Server":
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.log.seek(0)
                raise RuntimeError(f"the server did not start:\n{self.log.read().decode(errors='replace')}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (all threads): less sensitive than wall time to other load."""
        fields = open(f"/proc/{self.process.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024


def image_url(colour) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def payload(i: int, max_tokens: int, stream: bool = True) -> dict:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(COLOURS[i % 4])}},
                                                  {"type": "text", "text": QUESTION}]}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def timed_request(http: httpx.AsyncClient, body: dict) -> dict:
    """Send one streamed request; seconds to the first content, to the end, and the tokens generated."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    ended = time.perf_counter()
    first = first or ended
    return {"ttft_s": first - started, "seconds": ended - started,
            "tpot_s": (ended - first) / (tokens - 1) if tokens > 1 else 0.0, "tokens": tokens}


def run_setting(server: Server, concurrency: int, count: int, max_tokens: int) -> dict:
    """`count` requests, `concurrency` at a time (1: one after another), with the server's CPU seconds."""
    cpu = server.cpu_seconds()
    result = asyncio.run(_run_setting(server.url, concurrency, count, max_tokens))
    result["server_cpu_s"] = server.cpu_seconds() - cpu
    return result


async def _run_setting(url: str, concurrency: int, count: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=max(concurrency, 1))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        if concurrency == 1:
            results = [await timed_request(http, payload(i, max_tokens)) for i in range(count)]
        else:
            results = []
            for start in range(0, count, concurrency):
                wave = [timed_request(http, payload(i, max_tokens)) for i in range(start, min(count, start + concurrency))]
                results += await asyncio.gather(*wave)
        total = time.perf_counter() - started
    return {"total_s": total, "requests": results}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def burst(url: str, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=count)) as http:
        responses = await asyncio.gather(*[http.post("/v1/chat/completions", json=payload(i, 4, stream=False))
                                           for i in range(count)])
    for response in responses:
        if response.status_code == 503:
            assert response.headers.get("retry-after") and response.json()["error"]["code"] == 503
    return [r.status_code for r in responses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: a small random-init model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (exactly, ignore_eos)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--burst", type=int, default=200, help="requests sent at once to the small-queue server")
    parser.add_argument("--burst-queue", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/serving.json"))
    args = parser.parse_args()
    largest = max(args.concurrency)

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or build_small_model(Path(scratch))
        rows: dict[str, list[dict]] = {}
        ratios = []
        with Server(model, "--max-batch-size", str(largest), "--max-queue", str(4 * largest)) as server:
            run_setting(server, 2, 2, args.max_tokens)  # warm-up
            for repeat in range(args.repeats):
                # Alternate which comes first, so a slow drift of the machine's load favours neither side.
                plan = [("sequential", 1, largest)] + [(f"concurrent {n}", n, n) for n in args.concurrency]
                for name, concurrency, count in plan if repeat % 2 == 0 else plan[::-1]:
                    rows.setdefault(name, []).append(run_setting(server, concurrency, count, args.max_tokens))
                sequential, together = rows["sequential"][-1], rows[f"concurrent {largest}"][-1]
                ratios.append({"wall": sequential["total_s"] / together["total_s"],
                               "server_cpu": sequential["server_cpu_s"] / together["server_cpu_s"]})

        with Server(model, "--max-batch-size", "4", "--max-queue", str(args.burst_queue)) as server:
            asyncio.run(burst(server.url, 4))  # warm-up
            before = server.rss_mib()
            first = asyncio.run(burst(server.url, args.burst))
            after_first = server.rss_mib()
            second = asyncio.run(burst(server.url, args.burst))
            after_second = server.rss_mib()

    table = []
    for name, runs in rows.items():
        requests = [r for run in runs for r in run["requests"]]
        totals = [run["total_s"] for run in runs]
        count = len(runs[0]["requests"])
        table.append({
            "setting": name,
            "requests": count,
            "total_s_median": round(statistics.median(totals), 3),
            "total_s_range": [round(min(totals), 3), round(max(totals), 3)],
            "requests_per_s": round(count / statistics.median(totals), 2),
            "tokens_per_s": round(sum(r["tokens"] for r in runs[0]["requests"]) / statistics.median(totals), 1),
            "ttft_ms_p50": round(1000 * percentile([r["ttft_s"] for r in requests], 50), 1),
            "ttft_ms_p95": round(1000 * percentile([r["ttft_s"] for r in requests], 95), 1),
            "tpot_ms_p50": round(1000 * percentile([r["tpot_s"] for r in requests], 50), 2),
            "tpot_ms_p95": round(1000 * percentile([r["tpot_s"] for r in requests], 95), 2),
            "server_cpu_s_median": round(statistics.median(run["server_cpu_s"] for run in runs), 3),
        })
    wall = [r["wall"] for r in ratios]
    cpu = [r["server_cpu"] for r in ratios]
    summary = {
        "speedup_wall_per_repeat": [round(r, 2) for r in wall],
        "speedup_wall_median": round(statistics.median(wall), 2),
        "speedup_server_cpu_per_repeat": [round(r, 2) for r in cpu],
        "speedup_server_cpu_median": round(statistics.median(cpu), 2),
        "repeats_at_least_3x_wall": sum(r >= 3 for r in wall),
        "burst": {
            "requests": args.burst, "queue": args.burst_queue, "batch": 4,
            "ok": [first.count(200), second.count(200)], "refused_503": [first.count(503), second.count(503)],
            "other": [len(first) - first.count(200) - first.count(503), len(second) - second.count(200) - second.count(503)],
            "server_rss_mib": {"before": round(before, 1), "after_first": round(after_first, 1),
                               "after_second": round(after_second, 1)},
        },
    }
    settings = {"model": str(args.model) if args.model else "small random-init (see the docstring)",
                "max_tokens": args.max_tokens, "repeats": args.repeats, "concurrency": args.concurrency,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version()}

    columns = ["setting", "requests", "total_s_median", "total_s_range", "requests_per_s", "tokens_per_s",
               "ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "tpot_ms_p95", "server_cpu_s_median"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(f"\nsequential {largest} / concurrent {largest}, per repeat: wall {summary['speedup_wall_per_repeat']} "
          f"(median {summary['speedup_wall_median']}x), server CPU {summary['speedup_server_cpu_per_repeat']} "
          f"(median {summary['speedup_server_cpu_median']}x)")
    b = summary["burst"]
    print(f"burst of {args.burst} twice, queue {args.burst_queue}: 200 OK {b['ok']}, 503 {b['refused_503']}, other "
          f"{b['other']}; server RSS MiB {b['server_rss_mib']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": settings, "table": table, "summary": summary, "raw": rows}, indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
