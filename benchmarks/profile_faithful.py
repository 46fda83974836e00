"""Where a sandboxed faithful score's time goes, against the same score in process.

    python benchmarks/profile_faithful.py [--spec faithful] [--seeds sink_window] [--repeat 2]

A faithful score is a sequence of masker calls (decode steps x layers), each a round trip to the
session's worker. Per seed it prints the in-process and sandboxed times, the time the parent
waited on the candidate (``candidate_s``), and the parent's share of each round trip: packing a
call, sending it, waiting for and reading the reply, and
decoding the selection; and the worker's, from its log (``ADRS_PROFILE_SESSION=1``: each phase
synchronised, so the profiled run is slower than the timed ones). ``--pingpong N`` also times N round trips of a one-element GPU op
between two processes against the same ops in one process, and with the second process on the
CPU, for turns of 1, 10 and 40 ops: the floor any cross-process call pays on this machine.
``--pieces`` times each piece of a call alone in one process. ``--synthetic`` runs the same calls
without the model (random tensors of the preset's shapes). ``--scorer-calls N`` times faithful
scores as the agent's tool gets them (a run's ``CodeScorer`` keeps the context and a warm worker)
against a one-off ``faithful_score``. Sandboxed scores are timed with the session's shared device
block (``evaluator.sandbox.devshare``, where the GPU allows) and again over pipes only
(``ADRS_SESSION_SHARED=0``), in the same run. Prints a table; writes JSON
(``--out``, default ``benchmarks/results/profile_faithful.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from timing import median_time  # noqa: E402

_PEER = r"""
import os, sys, torch
device, r, w, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = torch.ones(1024, device=device)
while os.read(r, 1):
    for _ in range(ops):
        x = x * 1.0001
    x.sum().item()
    os.write(w, b"x")
"""


def pingpong(n: int, device: str, ops_per_turn: tuple[int, ...] = (1, 10, 40)) -> dict[str, float]:
    """Microseconds per round trip, for turns of ``ops`` elementwise ops and a sync on each side:
    one process doing both sides' turns, and two processes with the peer on ``device`` or on the
    CPU. The two-process extra is what switching the GPU between two contexts costs a turn."""
    import torch

    out: dict[str, float] = {}
    for ops in ops_per_turn:
        x = torch.ones(1024, device=device)

        def turn() -> None:
            nonlocal x
            for _ in range(ops):
                x = x * 1.0001
            x.sum().item()

        for _ in range(50):
            turn()
        t0 = time.perf_counter()
        for _ in range(n):
            turn()
            turn()
        out[f"{ops}_ops_one_process_us"] = 1e6 * (time.perf_counter() - t0) / n
        for label, peer_device in (("two_processes_us", device), ("peer_on_cpu_us", "cpu")):
            to_peer_r, to_peer_w = os.pipe()
            back_r, back_w = os.pipe()
            peer = subprocess.Popen([sys.executable, "-c", _PEER, peer_device, str(to_peer_r), str(back_w), str(ops)],
                                    pass_fds=(to_peer_r, back_w))
            os.close(to_peer_r)
            os.close(back_w)
            for _ in range(50):
                os.write(to_peer_w, b"x")
                os.read(back_r, 1)
            t0 = time.perf_counter()
            for _ in range(n):
                turn()
                os.write(to_peer_w, b"x")
                os.read(back_r, 1)
            out[f"{ops}_ops_{label}"] = 1e6 * (time.perf_counter() - t0) / n
            os.close(to_peer_w)
            peer.wait(30)
            os.close(back_r)
    return out


def call_pieces(device: str, repeat: int = 200) -> dict[str, float]:
    """Milliseconds per piece of a session call at the ``faithful`` preset's shapes, each timed alone
    in this one process (sink_window's selection): what a call costs without a second process."""
    import torch

    from evaluator.candidate import load_masker
    from evaluator.contract import MaskerInput
    from evaluator.batch_scoring import validated_weights
    from evaluator.records import AttentionRecord
    from evaluator.sandbox.channel import pack
    from evaluator.sandbox.devicepack import decode_dense_selection, encode_for_wire

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q = torch.randn(16, 9, 1, 64, device=dev, dtype=dtype)
    k = torch.randn(16, 3, 1, 64, device=dev, dtype=dtype)
    pos = torch.arange(8160, 8161, device=dev)
    keys = torch.randn(16, 3, 8161, 64, device=dev, dtype=dtype)
    header = {"op": "call", "layer": 1, "call": 2, "start": 8160, "scaling": 0.125, "num_layers": 30}
    host = {"q": q.cpu(), "k": k.cpu(), "pos": pos.cpu()}
    masker = load_masker(REPO / "seeds" / "sink_window.py")
    gen = torch.Generator(device=dev)

    def masker_call() -> Any:
        return masker(MaskerInput(queries=q, keys=keys.clone(), scaling=0.125, query_positions=pos, layer_idx=0,
                                  num_layers=30, density_target=0.1, generator=gen, state={}))

    shape = (16, 9, 1, 8161)
    selection = masker_call()
    tensors, meta = encode_for_wire(selection, shape, 3, str(dev))
    record = AttentionRecord(-1, 0, 30, q, keys, q.new_empty(0), pos, 0.125, q.new_empty(0))
    pieces: dict[str, Callable[[], Any]] = {
        "parent: pack a call (3 device-to-host copies, framing)": lambda: pack(header, {n: v.cpu() for n, v in (("q", q), ("k", k), ("pos", pos))}),
        "worker: the call onto the device": lambda: [v.to(dev) for v in host.values()],
        "worker: masker (keys copied for it)": masker_call,
        "worker: encode the selection": lambda: encode_for_wire(selection, shape, 3, str(dev)),
        "worker: pack the reply": lambda: pack({"meta": meta}, tensors),
        "parent: decode the reply": lambda: decode_dense_selection(meta, tensors, shape, 3, dev),
        "parent: validate (in process too)": lambda: validated_weights(selection, record),
    }
    out = {}
    for name, fn in pieces.items():
        for _ in range(10):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        out[name] = 1e3 * (time.perf_counter() - t0) / repeat
    return out


class _PhaseClock:
    """Seconds the parent spends in each named function during a sandboxed score (patched in place)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed_call(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.totals[label] += time.perf_counter() - t
                self.calls[label] += 1

        setattr(owner, name, timed_call)
        self._undo.append(lambda: setattr(owner, name, original))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


class SyntheticContext:
    """A faithful decode's masker calls without the model: ``steps`` x ``layers`` calls on random
    queries and keys of the ``faithful`` preset's shapes (SmolLM2: 9 query heads, 3 KV heads,
    d = 64; 2 x 8 rows; a shared prefix), through the same selectors, session and validation.
    Isolates what crossing the sandbox costs per call from the model's own time (``--synthetic``)."""

    def __init__(self, device: str, steps: int = 21, layers: int = 30, samples: int = 8, context: int = 8150,
                 question: int = 10) -> None:
        import torch

        from evaluator.faithful.decode import CallInputs
        from evaluator.faithful.score import write_prefix_file

        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        gen = torch.Generator(device="cpu").manual_seed(0)
        rows, heads, kv_heads, dim = 2 * samples, 9, 3, 64
        self.max_len = context + question + steps
        self.keys = []
        for _ in range(layers):
            k = torch.zeros(rows, kv_heads, self.max_len, dim, dtype=dtype)
            k[:samples, :, :context] = torch.randn(samples, kv_heads, context, dim, generator=gen).to(dtype)
            k[samples:, :, :context] = k[:samples, :, :context]
            self.keys.append(k.to(self.device))
        self.prefix = write_prefix_file([k[:samples, :, :context] for k in self.keys])
        self.calls: list[Any] = []
        start = context
        for step in range(steps):
            q_len = question if step == 0 else 1
            for layer in range(layers):
                q = torch.randn(rows, heads, q_len, dim, generator=gen).to(dtype).to(self.device)
                new = torch.randn(rows, kv_heads, q_len, dim, generator=gen).to(dtype).to(self.device)
                pos = torch.arange(start, start + q_len, device=self.device)
                self.calls.append((layer, layers, step, q, new, start, pos))
            start += q_len
        self.CallInputs = CallInputs

    def score(self, seed: Path, density_target: float, in_process: bool = False, pool: Any = None) -> Any:
        """Runs every call through the in-process or the session selector; ``error`` is a checksum."""
        import types

        import torch

        from evaluator.candidate import load_masker
        from evaluator.faithful.score import in_process_selector, session_selector
        from evaluator.sandbox.session import SandboxSession, shared_sizes

        def run(select: Any) -> float:
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for layer, layers, step, q, new, start, pos in self.calls:
                keys = self.keys[layer]
                keys[:, :, start:start + new.shape[2]] = new
                inputs = self.CallInputs(layer, layers, step, q, keys[:, :, :start + new.shape[2]], new, start, pos, 0.125)
                total += select(inputs).sum(dtype=torch.float64)
            return float(total)

        t0 = time.perf_counter()
        if in_process:
            checksum, candidate_s = run(in_process_selector(load_masker(seed), density_target, 0)), None
        else:
            q = self.calls[0][3]  # the question's: the largest call
            setup = {"prefix": str(self.prefix), "row_groups": 2, "max_len": self.max_len,
                     "shared": shared_sizes(q.shape[0], q.shape[1], self.keys[0].shape[1], q.shape[3], self.max_len,
                                            max_q=q.shape[2])}
            if pool is not None:
                pool.prefetch(self.prefix, str(self.device))  # as FaithfulContext.score does
            with SandboxSession(seed, self.device, density_target, 0, setup, pool=pool) as session:
                checksum = run(session_selector(session))
            candidate_s = session.candidate_s
        return types.SimpleNamespace(valid=True, error=checksum, n_calls=len(self.calls), candidate_s=candidate_s,
                                     wall_s=time.perf_counter() - t0)

    def close(self) -> None:
        from evaluator.sandbox.transport import remove_file

        remove_file(self.prefix)


def profile_seed(ctx: Any, seed: Path, repeat: int) -> dict[str, Any]:
    from evaluator.sandbox import SandboxLimits, WorkerPool
    from evaluator.sandbox import channel, session, worker_process

    limits = SandboxLimits(wall_s=300)
    t_in, ref = median_time(lambda: ctx.score(seed, 0.1, in_process=True), repeat)
    row: dict[str, Any] = {"in_process_s": t_in, "calls": ref.n_calls}
    with WorkerPool(limits, cuda=ctx.device.type == "cuda") as pool:
        warm = lambda: pool.wait_ready(limits.startup_s)  # noqa: E731
        # Untimed, as a run's scorer would have done before: from then on the pool's spares preload the prefix keys.
        warm()
        ctx.score(seed, 0.1, pool=pool)
        t_sb, rep = median_time(lambda: ctx.score(seed, 0.1, pool=pool), repeat, warm)
        row.update(sandbox_s=t_sb, candidate_s=rep.candidate_s, exact=rep.valid and rep.error == ref.error)
        os.environ[session.SHARED_ENV] = "0"  # the same tree over pipes only: the shared block's gain in one run
        try:
            t_pipes, rep_pipes = median_time(lambda: ctx.score(seed, 0.1, pool=pool), repeat, warm)
        finally:
            os.environ.pop(session.SHARED_ENV)
        row.update(sandbox_pipes_s=t_pipes, exact_pipes=rep_pipes.valid and rep_pipes.error == ref.error)
        clock = _PhaseClock()
        clock.wrap(session, "pack", "pack")
        clock.wrap(channel.DeadlineIO, "send", "send")
        clock.wrap(channel.DeadlineIO, "receive", "wait + read the reply")
        clock.wrap(session, "decode_dense_selection", "decode")
        clock.wrap(session.SandboxSession, "_put_inputs", "inputs into the shared block")
        clock.wrap(session.SandboxSession, "_shared_selection", "clone the shared selection")
        logs: list[str] = []
        release = worker_process.Worker.release

        def keep_log(worker: Any) -> None:
            release(worker)
            logs.append(worker._reader.text())

        worker_process.Worker.release = keep_log
        os.environ[session.PROFILE_ENV] = "1"  # the worker logs its phases (each one synchronised)
        warm()
        try:
            t0 = time.perf_counter()
            ctx.score(seed, 0.1, pool=pool)
            row["profiled_s"] = time.perf_counter() - t0
        finally:
            clock.restore()
            worker_process.Worker.release = release
            os.environ.pop(session.PROFILE_ENV)
        row["parent_ms_per_call"] = {k: 1e3 * v / max(1, clock.calls[k]) for k, v in clock.totals.items()}
        lines = [ln for log in logs for ln in log.splitlines() if ln.startswith("session_profile_ms ")]
        row["worker_ms_per_call"] = json.loads(lines[-1].split(" ", 1)[1]) if lines else None
    return row


def run_scorer(spec: str, seed: Path, calls: int, device: str) -> dict[str, Any]:
    """Seconds per faithful score as the agent's tool asks for them: a one-off ``faithful_score``
    (model, prefill, reference and a fresh worker each time: what every call cost before the run
    kept them), then ``calls`` calls of one run's ``CodeScorer.faithful``."""
    import torch

    from adrs.config import parse_config
    from adrs.evaluate import CodeScorer
    from evaluator.faithful import faithful_score
    from evaluator.workload import load_workload

    t0 = time.perf_counter()
    faithful_score(seed, spec, 0.1, device=device)
    row: dict[str, Any] = {"one_off_s": time.perf_counter() - t0, "scorer_s": []}
    cfg = parse_config({"name": "profile", "workload": "tiny", "heldout_workload": None, "iterations": 1,
                        "seed_candidate": str(seed)})
    scorer = CodeScorer(cfg, load_workload("tiny", progress=False))  # its fast workload goes unused here
    code = seed.read_text()
    try:
        for _ in range(calls):
            t0 = time.perf_counter()
            scorer.faithful(code, spec)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row["scorer_s"].append(time.perf_counter() - t0)
    finally:
        scorer.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--spec", default="faithful")
    ap.add_argument("--seeds", type=lambda s: [x for x in s.split(",") if x], default=["sink_window"],
                    help="comma-separated; empty: only --pingpong / --pieces")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--pingpong", type=int, default=600, help="round trips to time (0: skip)")
    ap.add_argument("--scorer-calls", type=int, default=0,
                    help="also time a one-off faithful_score and N faithful scores of one run's CodeScorer")
    ap.add_argument("--pieces", action="store_true", help="also time each piece of a call alone, in one process")
    ap.add_argument("--synthetic", action="store_true",
                    help="the faithful preset's masker calls on random tensors, without the model (see SyntheticContext)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_faithful.json"))
    args = ap.parse_args()
    result: dict[str, Any] = {"command": "python benchmarks/profile_faithful.py " + " ".join(sys.argv[1:])}
    if args.pingpong:
        result["pingpong"] = pingpong(args.pingpong, args.device)
        print("round trip, us:", {k: round(v, 1) for k, v in result["pingpong"].items()}, flush=True)
    if args.pieces:
        result["call_pieces_ms"] = call_pieces(args.device)
        for name, ms in result["call_pieces_ms"].items():
            print(f"    one process: {name:<56} {ms:7.3f} ms", flush=True)
    if args.scorer_calls:
        row = run_scorer(args.spec, REPO / "seeds" / f"{args.seeds[0]}.py", args.scorer_calls, args.device)
        result["run_scorer"] = row
        print(f"one-off faithful_score {row['one_off_s']:.2f} s; a run's CodeScorer.faithful, call by call: "
              + ", ".join(f"{t:.2f}" for t in row["scorer_s"]) + " s", flush=True)
    if not args.seeds:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)
        return
    if args.synthetic:
        ctx: Any = SyntheticContext(args.device)
    else:
        from evaluator.faithful import FaithfulContext

        ctx = FaithfulContext(args.spec, args.device)
        ctx.prefix_file()
    for name in args.seeds:
        row = profile_seed(ctx, REPO / "seeds" / f"{name}.py", args.repeat)
        result[name] = row
        per_call = 1e3 * (row["sandbox_s"] - row["in_process_s"]) / max(1, row["calls"])
        print(f"{name}: in process {row['in_process_s']:.3f} s, sandboxed {row['sandbox_s']:.3f} s "
              f"({row['sandbox_s'] / row['in_process_s']:.2f}x, {per_call:.2f} ms more per call over {row['calls']} calls), "
              f"waiting on the candidate {row['candidate_s']:.3f} s, exact {row['exact']}; over pipes only "
              f"{row['sandbox_pipes_s']:.3f} s ({row['sandbox_pipes_s'] / row['in_process_s']:.2f}x), exact {row['exact_pipes']}",
              flush=True)
        for side in ("parent", "worker"):
            for phase, ms in (row[f"{side}_ms_per_call"] or {}).items():
                print(f"    {side} {phase:<28} {ms:7.3f} ms per call", flush=True)
    ctx.close()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
