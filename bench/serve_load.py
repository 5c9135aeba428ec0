"""Load on `vae-rt serve`: C concurrent clients sending requests of B latents, for a fixed time each.

Two servers run side by side, bound the same way (`vae_rt.serve`): `vae-rt serve` with the decoder, and
the same binding with a no-op decode that returns zeros, the floor of PyTriton + Triton themselves.
For every (C, B) the two take turns for `--rounds` rounds; the medians are printed: requests/s,
samples/s, p50/p99 latency, the mean batch Triton formed (from its metrics: inference count over
execution count), errors, and wrong answers (each client sends its own z and checks every image
against a local decode). Beside them, in the same run, the offline decode rate at batch B.
"Lost" counts the difference between the latents the server decoded and those answered.

Clients are gRPC (`tritonclient.grpc.aio`), one connection each, in this one process.

Run: `flock /tmp/vae-rt-bench.lock python bench/serve_load.py [--clients 1,16,64,256] [--batches 1,64]
[--duration 2] [--rounds 3] [--backend auto] [--json out.json]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vae_rt.serve import IMAGE_SIZE
from vae_rt.serve_process import ServerProcess

MODEL = "vae_decoder"
Z_DIM = 2  # the bundled model's
ATOL = 1e-5  # the project's fp32 tolerance: a merged batch may change the last bits
STARTUP_S = 300
KINDS = ("decoder", "noop")


@dataclass
class Run:
    """One timed load: `clients` concurrent clients, `batch` latents a request, against `model`."""

    model: str
    clients: int
    batch: int
    seconds: float
    answered: int
    errors: int
    wrong: int
    lost: int
    p50_ms: float
    p99_ms: float
    mean_batch: float

    @property
    def requests_per_s(self) -> float:
        return self.answered / self.seconds

    @property
    def samples_per_s(self) -> float:
        return self.answered * self.batch / self.seconds


def start_server(kind: str, backend: str, queue_delay_us: int, log_dir: Path) -> ServerProcess:
    """'decoder' is `vae-rt serve`; 'noop' is this script's `--serve-noop`, the same binding with zeros for images."""
    delay = ["--max-queue-delay-us", str(queue_delay_us)]
    if kind == "decoder":
        command = [sys.executable, "-m", "vae_rt", "serve", "--backend", backend, "--threads", str(torch.get_num_threads()),
                   *delay]
    else:
        command = [sys.executable, __file__, "--serve-noop", *delay]
    return ServerProcess(command, log_dir / f"{kind}.log")


def counters(server: ServerProcess) -> tuple[float, float]:
    """(inferences, executions) once they stop moving: Triton counts a request just after answering it."""
    last = None
    while (now := (server.counter("nv_inference_count"), server.counter("nv_inference_exec_count"))) != last:
        last = now
        time.sleep(0.1)
    return now


async def client_loop(url: str, z: np.ndarray, expected: np.ndarray, stop_at: float, latencies: list[float],
                      tally: dict[str, int]) -> None:
    import tritonclient.grpc.aio as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("z", list(z.shape), "FP32")
    tensor.set_data_from_numpy(z)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                result = await client.infer(MODEL, [tensor])
            except InferenceServerException:
                tally["errors"] += 1
                continue
            latencies.append(time.perf_counter() - started)
            tally["answered"] += 1
            if not np.allclose(result.as_numpy("image"), expected, rtol=0, atol=ATOL):
                tally["wrong"] += 1
    finally:
        await client.close()


def run_load(kind: str, server: ServerProcess, clients: int, batch: int, duration: float, expect) -> Run:
    """`clients` clients for `duration` seconds; client i sends its own z and checks each answer."""
    rng = np.random.default_rng(clients * 1000 + batch)
    jobs = [rng.standard_normal((batch, Z_DIM), dtype=np.float32) for _ in range(clients)]
    wanted = [expect(z) for z in jobs]
    latencies: list[float] = []
    tally = {"answered": 0, "errors": 0, "wrong": 0}
    before = counters(server)

    async def everyone() -> float:
        started = time.perf_counter()
        stop_at = started + duration
        await asyncio.gather(*(client_loop(f"127.0.0.1:{server.grpc}", z, w, stop_at, latencies, tally)
                               for z, w in zip(jobs, wanted)))
        return time.perf_counter() - started

    seconds = asyncio.run(everyone())
    after = counters(server)
    inferred, executions = after[0] - before[0], after[1] - before[1]
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return Run(
        model=kind, clients=clients, batch=batch, seconds=seconds, answered=tally["answered"],
        errors=tally["errors"], wrong=tally["wrong"], lost=int(inferred) - tally["answered"] * batch,
        p50_ms=float(np.percentile(ms, 50)), p99_ms=float(np.percentile(ms, 99)),
        mean_batch=inferred / executions if executions else float("nan"),
    )


def offline_rate(sampler, batch: int, seconds: float) -> float:
    """Samples/s of `Sampler.decode` at `batch`, in this process, while the servers idle."""
    z = np.random.default_rng(batch).standard_normal((batch, Z_DIM), dtype=np.float32)
    sampler.decode(z)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        sampler.decode(z)
        calls += 1
    return calls * batch / elapsed


def summarize(runs: list[Run]) -> dict[str, float]:
    """Medians of a config's rounds; errors, wrong and lost answers are summed (any one is a failure)."""
    summary = {f: statistics.median(getattr(r, f) for r in runs)
               for f in ("requests_per_s", "samples_per_s", "p50_ms", "p99_ms", "mean_batch")}
    return {**summary, **{f: sum(getattr(r, f) for r in runs) for f in ("errors", "wrong", "lost")}}


def serve_noop(argv: list[str]) -> None:
    """The no-op server: `vae_rt.serve`'s binding, with a decode that returns zeros."""
    from vae_rt.serve import decode_requests, serve_model
    from vae_rt.serve_options import ServeOptions

    parser = argparse.ArgumentParser()
    for option in ("--http-port", "--grpc-port", "--metrics-port", "--max-queue-delay-us"):
        parser.add_argument(option, type=int, required=True)
    args = parser.parse_args(argv)
    options = ServeOptions(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                           max_queue_delay_us=args.max_queue_delay_us)
    serve_model(decode_requests(lambda z: np.zeros((len(z), IMAGE_SIZE), np.float32)), Z_DIM, options, lambda: None)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-noop"]:
        return serve_noop(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,16,64,256")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of load per (clients, batch, model, round)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    parser.add_argument("--threads", type=int, help="CPU threads of a decode, offline and in the server (default: torch's)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    from vae_rt import open_sampler
    from vae_rt.bench import describe_machine

    logs = tempfile.TemporaryDirectory(prefix="serve-load-")
    servers = {kind: start_server(kind, args.backend, args.max_queue_delay_us, Path(logs.name)) for kind in KINDS}
    try:
        started = time.perf_counter()
        for server in servers.values():
            server.wait_ready(STARTUP_S)
        print(f"servers ready after {time.perf_counter() - started:.1f} s", file=sys.stderr)
        with open_sampler(backend=args.backend) as sampler:
            expect = {"decoder": lambda z: sampler.decode(z).reshape(len(z), -1).numpy(),
                      "noop": lambda z: np.zeros((len(z), IMAGE_SIZE), np.float32)}
            for kind in KINDS:  # the first requests of a server pay for its buffers; not timed
                run_load(kind, servers[kind], 1, max(batches), 0.2, expect[kind])
            offline = {b: offline_rate(sampler, b, args.duration / 2) for b in batches}
            what = sampler.describe()
            runs: dict[tuple[str, int, int], list[Run]] = {}
            for round_index in range(args.rounds):
                order = KINDS if round_index % 2 == 0 else KINDS[::-1]  # each goes first every other round
                for c in clients:
                    for b in batches:
                        for kind in order:
                            run = run_load(kind, servers[kind], c, b, args.duration, expect[kind])
                            runs.setdefault((kind, c, b), []).append(run)
    finally:
        for server in servers.values():  # both drain at once
            server.terminate()
        for server in servers.values():
            server.stop()
        logs.cleanup()
    report(runs, offline, f"{what}; {describe_machine()}", clients, batches, args)


def report(runs: dict, offline: dict[int, float], what: str, clients: list[int], batches: list[int], args) -> None:
    medians = {key: summarize(rs) for key, rs in runs.items()}
    print(f"vae-rt serve under load ({what}); medians of {args.rounds} interleaved rounds of "
          f"{args.duration:g} s; gRPC clients in one process")
    print(f"{'clients':>7} {'batch':>5} {'model':>7} {'req/s':>8} {'samples/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'mean batch':>10} {'errors':>6} {'wrong':>5} {'lost':>4} {'vs noop':>7} {'offline samples/s':>17}")
    for c in clients:
        for b in batches:
            noop = medians[("noop", c, b)]["requests_per_s"]
            for kind in KINDS:
                r = medians[(kind, c, b)]
                ratio = f"{noop / r['requests_per_s']:.2f}x" if kind == "decoder" and r["requests_per_s"] else ""
                rate = f"{offline[b]:,.0f}" if kind == "decoder" else ""
                print(f"{c:>7} {b:>5} {kind:>7} {r['requests_per_s']:>8,.0f} {r['samples_per_s']:>10,.0f} "
                      f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['mean_batch']:>10.1f} {r['errors']:>6} "
                      f"{r['wrong']:>5} {r['lost']:>4} {ratio:>7} {rate:>17}")
    if 1 in clients and 64 in clients and 1 in batches:
        one, many = medians[("decoder", 1, 1)], medians[("decoder", 64, 1)]
        print(f"64 clients, batch 1: mean batch {many['mean_batch']:.1f}, "
              f"{many['requests_per_s'] / one['requests_per_s']:.1f}x the requests/s of one client")
    bad = sum(r.errors + r.wrong + abs(r.lost) for rs in runs.values() for r in rs)
    print(f"errors + wrong + lost over every run: {bad}")
    if args.json:
        rows = [{**asdict(r), "requests_per_s": r.requests_per_s, "samples_per_s": r.samples_per_s}
                for rs in runs.values() for r in rs]
        args.json.write_text(json.dumps({"setup": what, "offline": offline, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
