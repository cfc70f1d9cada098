"""`dsv3 serve --ep N` and `dsv3 generate --ep N` as torchrun runs them (one process per rank,
torchrun's environment), and `dsv3 serve --role prefill|decode` as two processes: HTTP answers
equal the single-process engine's, SIGTERM drains and stops every process with status 0, a rank
that dies or hangs makes the others exit 1 with a message instead of hanging, and bad layouts
exit 2 before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _launch import free_port

from dsv3.cli import main
from dsv3.infer.cli import load
from dsv3.infer.sampling import SamplingParams
from fixtures import save_micro_model

TIMEOUT_S = "5"  # DSV3_COLLECTIVE_TIMEOUT_S of the ranks: a hung rank is noticed after this


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_file):
    return save_micro_model(tmp_path_factory.mktemp("ep_cli") / "micro", tokenizer_file)


def launch(n: int, *args: str) -> list[subprocess.Popen]:
    """`python -m dsv3 ARGS` in n processes with the environment torchrun gives its workers."""
    port = free_port()
    procs = []
    for rank in range(n):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "OMP_NUM_THREADS": "1",
            "DSV3_COLLECTIVE_TIMEOUT_S": TIMEOUT_S,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dsv3", *args],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def serving(folder, n: int = 2, *extra: str):
    """(processes, base url) once rank 0 answers /health."""
    port = free_port()
    procs = launch(
        n,
        "serve",
        "--checkpoint",
        str(folder),
        "--ep",
        str(n),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--shutdown-grace",
        "2",
        *extra,
    )
    return procs, wait_healthy(procs, port)


def wait_healthy(procs, port: int) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if httpx.get(url + "/health").status_code == 200:
                return url
        except httpx.TransportError:
            time.sleep(0.2)
    outputs = [p.communicate(timeout=30) for p in _killed(procs)]
    raise AssertionError(f"the ranks did not start serving: {outputs}")


def _killed(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    return procs


PROMPTS = ["def fibonacci(n):", "import os", "class Stack:", "for i in range(", "x = 1", "while True:"]


@pytest.fixture(scope="module")
def want(folder):
    """The single-process engine's greedy texts for PROMPTS (max_tokens 6, 7, ...)."""
    engine, tok = load(folder, dtype="float32", max_batch_size=8)
    params = [SamplingParams(max_tokens=6 + i, temperature=0) for i in range(len(PROMPTS))]
    return [o.text for o in engine.generate([tok.encode(p) for p in PROMPTS], params)]


def ask_all(url: str) -> list[str]:
    """PROMPTS sent at once; their texts."""

    def ask(i):
        body = {"model": "micro", "prompt": PROMPTS[i], "max_tokens": 6 + i, "temperature": 0}
        return httpx.post(url + "/v1/completions", json=body, timeout=60)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(ask, range(len(PROMPTS))))
    assert [a.status_code for a in answers] == [200] * len(PROMPTS), [a.text for a in answers]
    return [a.json()["choices"][0]["text"] for a in answers]


def test_serve_answers_as_one_process_then_sigterm_stops_every_rank(folder, want):
    # requests wait for a slot, then join; 2 extra expert slots, re-placed every 0.3 s while serving
    procs, url = serving(
        folder, 2, "--max-batch-size", "2", "--redundant-experts", "2", "--eplb-interval", "0.3"
    )
    try:
        assert ask_all(url) == want
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(timeout=30) for p in procs] == [0, 0]
        assert "EPLB: " in procs[0].communicate()[1]  # re-placed while serving
    finally:
        _killed(procs)


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_makes_rank_0_exit_with_a_message(folder, how):
    procs, url = serving(folder, 2)
    try:
        started = time.time()
        if how == "dies":
            procs[1].kill()
        else:
            procs[1].send_signal(signal.SIGSTOP)
        assert procs[0].wait(timeout=60) == 1
        err = procs[0].communicate()[1]
        assert (
            "rank 0:" in err
            and "the ranks are out of step: another rank has died or stopped answering" in err
        ), err
        assert time.time() - started < 30
    finally:
        _killed(procs)


def test_disaggregated_prefill_and_decode_workers_answer_as_one_process(folder, want):
    peer, port = f"127.0.0.1:{free_port()}", free_port()
    common = [
        "serve",
        "--checkpoint",
        str(folder),
        "--dtype",
        "float32",
        "--peer",
        peer,
        "--shutdown-grace",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.Popen(
        [sys.executable, "-m", "dsv3", *common, *a],
        env=env,
        text=True,  # noqa: E731
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    decode = run("--role", "decode", "--max-batch-size", "2")  # requests wait there for a slot
    procs = [decode]
    try:
        deadline = time.time() + 60
        while (
            "waiting for the prefill worker" not in (decode.stderr.readline() or "")
            and time.time() < deadline
        ):
            assert decode.poll() is None
        procs.append(run("--role", "prefill", "--port", str(port)))
        url = wait_healthy(procs, port)
        assert ask_all(url) == want
        procs[1].send_signal(signal.SIGTERM)
        assert [p.wait(timeout=30) for p in procs] == [0, 0]
    finally:
        _killed(procs)


def test_generate_under_torchrun_prints_the_single_process_text(folder):
    engine, tok = load(folder, dtype="float32", mtp=True, max_batch_size=1)
    text = engine.generate([tok.encode(PROMPTS[0])], SamplingParams(max_tokens=10, temperature=0))[0].text
    args = [
        "generate",
        "--checkpoint",
        str(folder),
        "--prompt",
        PROMPTS[0],
        "--max-tokens",
        "10",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--mtp",
        "--ep",
        "2",
    ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "dsv3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV3_COLLECTIVE_TIMEOUT_S": TIMEOUT_S}
    two = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=180, env=env)
    assert two.returncode == 0, two.stderr
    assert two.stdout == PROMPTS[0] + text + "\n"
    assert "MTP acceptance" in two.stderr


@pytest.mark.parametrize(
    "world,ep,message",
    [
        (1, "2", "--ep 2: the world has 1 process(es)"),
        (3, "3", "--ep 3: expert parallelism ep=3 must divide n_routed_experts=8; choose ep in [1, 2, 4, 8]"),
        (1, "0", "--ep 0: must be the number of ranks, >= 1"),
        (
            2,
            "2 --redundant-experts 1",
            "--redundant-experts 1: redundant experts R=1: the 8 experts + R slots must "
            "split evenly over the ep=2 ranks, but 8 + 1 = 9 does not; choose R in [0, 2, 4]",
        ),
        (2, "2 --eplb-interval 0", "--eplb-interval 0.0: must be a number of seconds > 0"),
    ],
)
def test_bad_layouts_exit_2_before_any_work(folder, monkeypatch, capsys, world, ep, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for command, extra in (("serve", []), ("generate", ["--prompt", "x"])):
        assert main([command, "--checkpoint", str(folder), "--ep", *ep.split(), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
