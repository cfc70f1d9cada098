"""Soak: many clients against a real `dsv3 serve` process for a while, well-behaved ones mixed
with clients that give up and clients that send hostile requests.

Each client loops for --duration seconds, picking per request (weights in MIX):
    complete / chat       non-streaming completion or chat, must answer 200 with a whole answer
    stream / chat_stream  streamed, must end with finish_reason and [DONE]; its TTFT is the time
                          to the first chunk that carries text
    abandon               a long non-streaming request dropped after 0.3 s, or a stream dropped
                          after its first chunk (the server must abort them, not run them out)
    hostile               one of HOSTILE (numbers out of range, lone surrogates, a 5 MB body, a
                          512K-character stop string, broken JSON, ...), must get its 4xx
and the script reports requests and generated tokens per second, p50/p99 latency and TTFT of the
well-formed requests, the errors (any well-formed request that failed, any hostile one answered
otherwise than expected), the server's RSS before and after, and whether it is idle and healthy
at the end (no request in flight, no cache block held). --max-concurrent is set above the number
of clients, so a well-formed request has no reason to fail.

    python benchmarks/soak.py [--checkpoint DIR] [--clients 16] [--duration 60]

Without --checkpoint it serves the trained tiny model of `make run` if there is one, else a
tiny model with random weights and a tokenizer trained on the Python stdlib (made in a temporary
folder; its answers are nonsense, the serving work is real).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import TRAINED_RUN, save_result  # noqa: E402

MIX = {"complete": 3, "chat": 2, "stream": 3, "chat_stream": 2, "abandon": 1, "hostile": 1}
PROMPTS = [
    "def fib(n):",
    "import os\n",
    "class Stack:\n    def push(self, x):",
    "for i in range(10):",
    "# sort a list",
]
HOSTILE = [  # (name, path, body: dict or raw bytes, expected status)
    (
        "top_k 2**63",
        "/v1/completions",
        {"prompt": "a", "max_tokens": 2, "temperature": 1, "top_k": 2**63},
        400,
    ),
    ("seed 2**64", "/v1/completions", {"prompt": "a", "seed": 2**64}, 400),
    ("lone surrogate", "/v1/completions", b'{"model":"M","prompt":"ab\\ud800cd"}', 400),
    (
        "raw surrogate bytes",
        "/v1/chat/completions",
        b'{"model":"M","messages":[{"role":"user","content":"a\xed\xa0\x80"}]}',
        400,
    ),
    ("5 MB body", "/v1/completions", {"prompt": "x " * 2_500_000}, 413),
    ("512K stop", "/v1/completions", {"prompt": "a", "stop": "x" * 524_288}, 400),
    ("broken JSON", "/v1/completions", b'{"model": "M", "prompt": ', 400),
    ("unknown model", "/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404),
    ("n = 10**30", "/v1/completions", {"prompt": "a", "n": 10**30}, 400),
    ("infinite penalty", "/v1/completions", b'{"model":"M","prompt":"a","repetition_penalty":1e999}', 400),
]


def random_model_folder(root: Path) -> Path:
    """A tiny model with random weights and a stdlib-trained tokenizer, saved HF-style."""
    import torch

    from dsv3.config import ModelConfig
    from dsv3.model.transformer import Transformer
    from dsv3.tokenizer import train_tokenizer
    from dsv3.train.data import Corpus

    folder = root / "tiny-random"
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=4096, max_position_embeddings=512)
    Transformer(cfg).save_pretrained(folder)
    train_tokenizer(Corpus(["stdlib"], max_bytes=2_000_000), 4096).save(str(folder / "tokenizer.json"))
    return folder


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """One soak client: its own connection pool, its own tallies."""

    def __init__(self, url: str, model: str, seed: int) -> None:
        self.url, self.model, self.rng = url, model, random.Random(seed)
        self.http = httpx.Client(base_url=url, timeout=120)
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.tokens = 0
        self.counts: dict[str, int] = dict.fromkeys(MIX, 0)
        self.errors: list[str] = []

    def run(self, until: float) -> None:
        kinds, weights = zip(*MIX.items())
        while time.time() < until:
            kind = self.rng.choices(kinds, weights)[0]
            self.counts[kind] += 1
            try:
                getattr(self, kind)()
            except Exception as e:  # a transport error on a request that must succeed
                if kind not in ("abandon", "hostile"):
                    self.errors.append(f"{kind}: {type(e).__name__}: {e}")
        self.http.close()

    def body(self, chat: bool, stream: bool) -> dict:
        body = {"model": self.model, "max_tokens": self.rng.randint(4, 32), "stream": stream}
        body |= {"temperature": self.rng.choice([0, 0.7, 1.0]), "seed": self.rng.randrange(1000)}
        if stream:
            body["stream_options"] = {"include_usage": True}
        prompt = self.rng.choice(PROMPTS)
        return body | ({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})

    def complete(self, chat: bool = False) -> None:
        started = time.perf_counter()
        r = self.http.post("/v1/chat/completions" if chat else "/v1/completions", json=self.body(chat, False))
        if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
            self.errors.append(f"{'chat' if chat else 'complete'}: {r.status_code} {r.text[:200]}")
            return
        self.latencies.append(time.perf_counter() - started)
        self.tokens += r.json()["usage"]["completion_tokens"]

    def chat(self) -> None:
        self.complete(chat=True)

    def stream(self, chat: bool = False) -> None:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        started, first, events = time.perf_counter(), None, []
        with self.http.stream("POST", path, json=self.body(chat, True)) as r:
            if r.status_code != 200:
                self.errors.append(f"stream: {r.status_code} {r.read()[:200]!r}")
                return
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if first is None and line != "data: [DONE]":
                    choices = json.loads(line.removeprefix("data: ")).get("choices") or [{}]
                    piece = choices[0].get("text") or choices[0].get("delta", {}).get("content")
                    if piece:
                        first = time.perf_counter() - started
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        finishes = [c.get("finish_reason") for chunk in chunks for c in chunk.get("choices", [])]
        if events[-1:] != ["data: [DONE]"] or not any(finishes) or any("error" in chunk for chunk in chunks):
            self.errors.append(f"stream: {events[-3:]}")
            return
        self.latencies.append(time.perf_counter() - started)
        if first is not None:
            self.ttfts.append(first)
        self.tokens += chunks[-1]["usage"]["completion_tokens"]

    def chat_stream(self) -> None:
        self.stream(chat=True)

    def abandon(self) -> None:
        body = {**self.body(False, False), "max_tokens": 200, "ignore_eos": True}
        if self.rng.random() < 0.5:
            try:
                httpx.post(self.url + "/v1/completions", json=body, timeout=0.3)
            except httpx.TimeoutException:
                pass
            return
        with self.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            next(r.iter_lines())  # one chunk, then hang up

    def hostile(self) -> None:
        name, path, body, expected = self.rng.choice(HOSTILE)
        if isinstance(body, bytes):
            r = self.http.post(
                path,
                content=body.replace(b'"M"', json.dumps(self.model).encode()),
                headers={"content-type": "application/json"},
            )
        else:
            r = self.http.post(path, json={"model": self.model, **body})
        if r.status_code != expected or "error" not in r.json():
            self.errors.append(f"hostile {name}: {r.status_code} (expected {expected}) {r.text[:200]}")


class HealthWatch(threading.Thread):
    """GET /health every 0.25 s while the clients run: the event loop's responsiveness."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.latencies, self.failures, self.done = url, [], 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            started = time.perf_counter()
            try:
                ok = httpx.get(self.url + "/health", timeout=30).status_code == 200
            except httpx.TransportError:
                ok = False
            self.latencies.append(time.perf_counter() - started)
            self.failures += not ok

    def stop(self) -> None:
        self.done.set()
        self.join()


def metric(url: str, name: str) -> float:
    lines = httpx.get(url + "/metrics", timeout=30).text.splitlines()
    return float(next(line.split(" ")[1] for line in lines if line.startswith(name + " ")))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or (TRAINED_RUN / "hf" if (TRAINED_RUN / "hf").is_dir() else None)
        checkpoint = Path(checkpoint) if checkpoint else random_model_folder(Path(tmp))
        port, model = free_port(), "soak"
        url = f"http://127.0.0.1:{port}"
        command = ["serve", "--checkpoint", str(checkpoint), "--port", str(port), "--model-name", model]
        command += ["--max-seq-len", "512", "--max-batch-size", str(args.max_batch_size)]
        command += ["--max-concurrent", str(4 * args.clients)]
        log_path = Path(tmp) / "server.log"  # a file: a pipe nobody reads would fill and block the server
        with log_path.open("w") as log_file:
            server = subprocess.Popen(
                [sys.executable, "-m", "dsv3", *command], stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.time() + 180
            while time.time() < deadline:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.3)
            Client(url, model, -1).complete()  # warm up
            rss_before = rss_mb(server.pid)
            clients = [Client(url, model, args.seed * 1000 + i) for i in range(args.clients)]
            started = time.time()
            threads = [threading.Thread(target=c.run, args=(started + args.duration,)) for c in clients]
            health = HealthWatch(url)
            for t in threads + [health]:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.time() - started
            health.stop()
            time.sleep(1.0)  # aborts of the last abandoned requests reach the engine
            rss_after = rss_mb(server.pid)
            healthy = httpx.get(url + "/health", timeout=30).status_code == 200
            idle = {name: metric(url, name) for name in ("dsv3_requests_in_flight", "dsv3_cache_blocks_used")}
            generated = metric(url, "dsv3_generation_tokens_total")
        finally:
            server.terminate()
            server.wait(timeout=60)
            log = log_path.read_text()
        exit_code = server.returncode

    latencies = [x for c in clients for x in c.latencies]
    ttfts = [x for c in clients for x in c.ttfts]
    errors = [e for c in clients for e in c.errors]
    counts = {k: sum(c.counts[k] for c in clients) for k in MIX}
    well_formed = sum(counts[k] for k in ("complete", "chat", "stream", "chat_stream"))
    result = {
        "checkpoint": str(args.checkpoint or checkpoint.name),
        "clients": args.clients,
        "duration_s": round(elapsed, 1),
        "max_batch_size": args.max_batch_size,
        "requests": counts,
        "well_formed_requests": well_formed,
        "well_formed_ok": len(latencies),
        "requests_per_s": round(sum(counts.values()) / elapsed, 2),
        "answered_tokens_per_s": round(sum(c.tokens for c in clients) / elapsed, 1),
        "generated_tokens_per_s": round(generated / elapsed, 1),
        "latency_s": {"p50": round(percentile(latencies, 50), 3), "p99": round(percentile(latencies, 99), 3)},
        "ttft_s": {"p50": round(percentile(ttfts, 50), 3), "p99": round(percentile(ttfts, 99), 3)},
        "health_latency_s": {
            "p50": round(percentile(health.latencies, 50), 3),
            "max": round(max(health.latencies, default=float("nan")), 3),
        },
        "health_failures": health.failures,
        "errors": len(errors),
        "error_samples": errors[:10],
        "rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1)},
        "healthy_after": healthy,
        "idle_after": idle,
        "exit_code_after_sigterm": exit_code,
    }
    print(json.dumps(result, indent=2))
    path = save_result("soak", result)
    print(f"wrote {path}")
    ok = (
        not errors and healthy and not any(idle.values()) and exit_code == 0 and len(latencies) == well_formed
    )
    if not ok:
        print(log[-3000:], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
