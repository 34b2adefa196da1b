"""The warm path of `celebctl serve` next to `celebctl render -n 1`, side by side in one run.

A data home gets the model and one identity (alice, a short fit); a server is started on it
(`celebctl serve`, its own process, loaded once). Then, alternating, one image of a prompt that
names alice is asked for through the WebUI API (`POST /sdapi/v1/txt2img`, the whole request
timed from the client) and made by `celebctl render -n 1` (the whole process timed: start-up,
model load, render), with the same prompt, steps, size, sampler, guidance and seed. Printed:
the medians and their ratio (target: the warm path costs at most 10 % of the CLI), and the
server's overhead over its own render time (request wall minus the job's render seconds).

    python benchmarks/bench_serve.py                         # tiny, CPU
    python benchmarks/bench_serve.py --write                 # update docs/benchmarks.md
    python benchmarks/bench_serve.py --model FOLDER --device cuda --steps 30 --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_description, write_section  # noqa: E402

PHOTO = ROOT / "tests" / "data" / "astronaut.png"
PROMPT = "alice riding a bike"


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CELEBCTL_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    return env


def _celebctl(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celebctl", *args], env=_env(home),
                          capture_output=True, text=True, check=True)


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def start_server(home: Path, model: str, device: str) -> tuple[subprocess.Popen, str]:
    """`celebctl serve` on a free port; returns once its model is loaded."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "celebctl", "serve", "--model", model, "--device", device,
         "--port", str(port), "--log-level", "warning"],
        env=_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if _get(f"{url}/api/status")["ready"]:
                return process, url
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not get ready")


def measure(model: str = "tiny", device: str = "cpu", steps: int = 20, size: int = 64,
            repeats: int = 3, fit_steps: int = 2) -> dict:
    """Time the warm path and the CLI, alternating; returns the figures."""
    with tempfile.TemporaryDirectory(prefix="celebctl-bench-serve-") as tmp:
        home = Path(tmp) / "home"
        _celebctl(home, "add", "alice", str(PHOTO), "--model", model, "--device", device,
                  "--steps", str(fit_steps), "--quiet")
        process, url = start_server(home, model, device)
        body = {"prompt": PROMPT, "steps": steps, "width": size, "height": size,
                "sampler_name": "DDIM", "eta": 0, "cfg_scale": 7.5, "seed": 0}
        try:
            _post(f"{url}/sdapi/v1/txt2img", body)  # the first request warms caches
            warm, overhead, cli = [], [], []
            for i in range(repeats):
                started = time.perf_counter()
                answer = _post(f"{url}/sdapi/v1/txt2img", {**body, "seed": i})
                warm.append(time.perf_counter() - started)
                info = json.loads(answer["info"])
                overhead.append(warm[-1] - info["celebctl"]["elapsed_s"])
                started = time.perf_counter()
                _celebctl(home, "render", PROMPT, "-n", "1", "--steps", str(steps),
                          "--width", str(size), "--height", str(size), "--scheduler", "ddim",
                          "--guidance", "7.5", "--seed", str(i), "--model", model,
                          "--device", device, "--quiet", "-o", str(Path(tmp) / "renders"))
                cli.append(time.perf_counter() - started)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(120)
    return {"model": model, "device": device, "steps": steps, "size": size,
            "repeats": repeats, "warm_s": statistics.median(warm),
            "overhead_s": statistics.median(overhead), "cli_s": statistics.median(cli),
            "ratio": statistics.median(warm) / statistics.median(cli)}


def table(result: dict) -> str:
    return "\n".join([
        "| what | median s | detail |", "|---|---|---|",
        f"| `POST /sdapi/v1/txt2img`, warm server | {result['warm_s']:.3f} | "
        f"server overhead over its render: {result['overhead_s']:.3f} s |",
        f"| `celebctl render -n 1` (end to end) | {result['cli_s']:.3f} | |",
        f"| warm path / CLI | {result['ratio']:.1%} | target <= 10 % |",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    result = measure(args.model, args.device, args.steps, args.size, args.repeats)
    text = table(result)
    print(text)
    print(json.dumps(result))
    if args.write:
        write_section(
            f"Serve warm path ({args.device.upper()}, {args.model})",
            f"Machine: {machine_description()}. One image of \"{PROMPT}\" (an identity), "
            f"{args.steps} DDIM steps, {args.size} px, medians of {args.repeats}, alternating "
            "(`python benchmarks/bench_serve.py --write`).\n\n" + text)


if __name__ == "__main__":
    main()
