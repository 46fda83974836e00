"""Where a sandboxed fast score's time goes: each stage of the worker's and the parent's
per-record pipeline timed on its own (warm, in this process), a fresh process's first pass over
the records against its second (CUDA loads kernels lazily), a worker's start-up phases, a
profile of the parent during ``run_candidate``, and the worker's own clock of each sandboxed run
(``worker_clock``: from the job to the first masker call, that call, and the rest).

    python benchmarks/profile_fast_score.py --workload synthetic --device cuda --seeds sink_window,oracle_topk

Prints a table and writes JSON (``--out``, default ``benchmarks/results/profile_fast_score.json``).
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))

from timing import flipped_scoring, median_time, timed  # noqa: E402


def stages(workload: Any, seed: Path, repeat: int) -> dict[str, float]:
    """Seconds over all records for each stage of the sandbox pipeline, cumulatively."""
    from evaluator.batch_scoring import RecordScorer
    from evaluator.candidate import load_masker, masker_input
    from evaluator.sandbox.channel import pack, unpack
    from evaluator.inprocess import score_masker
    from evaluator.sandbox.devicepack import decode_dense_selection, encode_for_wire
    from evaluator.sandbox.encode_batch import EncodeBatch

    masker = load_masker(seed)
    recs = workload.records
    d = str(recs[0].queries.device)

    def masker_only() -> None:
        for rec in recs:
            masker(masker_input(rec, 0.1, workload.spec.seed, state={}))

    def encoded() -> list:
        out = []
        for rec in recs:
            sel = masker(masker_input(rec, 0.1, workload.spec.seed, state={}))
            out.append(encode_for_wire(sel, rec.weights_shape, rec.keys.shape[1], d))
        return out

    enc = encoded()
    msgs = [pack({"i": i, "meta": m}, t) for i, (t, m) in enumerate(enc)]

    def packed() -> None:
        for i, (t, m) in enumerate(enc):
            pack({"i": i, "meta": m}, t)

    def parent_decode() -> list:
        out = []
        for msg, rec in zip(msgs, recs):
            hl, _ = struct.unpack("<QQ", msg[:16])
            header, tensors = unpack(msg[16:16 + hl], msg[16 + hl:])
            out.append(decode_dense_selection(header["meta"], tensors, rec.weights_shape, rec.keys.shape[1],
                                              rec.queries.device))
        return out

    weights = parent_decode()

    def score() -> None:
        s = RecordScorer(recs, None)
        for i, w in enumerate(weights):
            s.add(i, w)
        s.rows()

    def batch_encoded() -> list:
        # As a GPU worker does (fast_worker.serve_records): dense selections wait in a batch.
        out, batch = [], EncodeBatch(d)
        for rec in recs:
            sel = masker(masker_input(rec, 0.1, workload.spec.seed, state={}))
            if not batch.add(sel, rec.weights_shape, rec.keys.shape[1]):
                out += batch.drain()
                out.append(encode_for_wire(sel, rec.weights_shape, rec.keys.shape[1], d))
            elif batch.full():
                out += batch.drain()
        return out + batch.drain()

    def in_process() -> None:
        score_masker(masker, workload, 0.1)

    res = {}
    stages_ = [("masker", masker_only), ("masker+encode", encoded), ("pack", packed),
               ("unpack+decode", parent_decode), ("score", score), ("in process", in_process)]
    if d.startswith("cuda"):
        stages_.insert(2, ("masker+batch encode", batch_encoded))
    for name, fn in stages_:
        fn()
        res[name] = median_time(fn, repeat)[0]
    res["bytes_per_candidate"] = sum(len(m) for m in msgs)
    return res


def cold_pass(args: argparse.Namespace, seed: Path, workload: Any) -> dict[str, float]:
    """A fresh process: a spare's start-up phases, then the masker's first pass over the records
    (after the spare's rehearsal) against its second."""
    from evaluator.sandbox.transport import workload_inputs

    inputs = workload_inputs(workload)
    code = f"""
import sys, time, json
sys.path.insert(0, {str(REPO / 'benchmarks')!r})
t0 = time.perf_counter()
import torch
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
x = torch.ones(8, 8, device={args.device!r}); (x @ x).sum().item()
t_ctx = time.perf_counter() - t0
from profile_fast_score import _workload
wl = _workload({args.workload!r}, {args.device!r})
import dataclasses; wl = dataclasses.replace(wl, records=wl.records[:{args.records!r}])
from evaluator.candidate import load_masker, masker_input
m = load_masker({str(seed)!r})
def one():
    for r in wl.records:
        m(masker_input(r, 0.1, wl.spec.seed, state={{}}))
    if torch.cuda.is_available(): torch.cuda.synchronize()
import os
from evaluator.sandbox.transport import InputReader
from evaluator.sandbox.warmup import warm_encoder, warm_masker_ops
from evaluator.sandbox.devicepack import encode_selection_on_device
from safetensors.torch import save
if torch.cuda.is_available(): torch.cuda.synchronize()
t0 = time.perf_counter()
fd = os.open({str(inputs)!r}, os.O_RDONLY)
pre = InputReader(fd, {args.device!r}).records()
if torch.cuda.is_available(): torch.cuda.synchronize()
t_pre = time.perf_counter() - t0
t0 = time.perf_counter()
warm_encoder(encode_selection_on_device, save, str(pre[0].queries.device), pre[0].weights_shape)
warm_masker_ops(pre[0])
t_warm = time.perf_counter() - t0
t0 = time.perf_counter(); one(); t1 = time.perf_counter() - t0
t0 = time.perf_counter(); one(); t2 = time.perf_counter() - t0
print(json.dumps({{"import_torch_s": t_import, "cuda_init_s": t_ctx, "preload_s": t_pre, "rehearsal_s": t_warm,
                  "first_pass_s": t1, "second_pass_s": t2}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO),
                         env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    if out.returncode != 0:
        return {"error": out.stderr[-800:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _workload(name: str, device: str) -> Any:
    import bench_throughput

    return bench_throughput._workload(name, device)


def worker_start(args: argparse.Namespace, workload: Any) -> dict[str, float]:
    """Seconds from ``Worker()`` to ready, without and with the inputs preloaded, started as a
    fresh interpreter and forked by a (warm) fork server."""
    from evaluator.sandbox import SandboxLimits
    from evaluator.sandbox.spawn import ForkServer
    from evaluator.sandbox.transport import workload_inputs
    from evaluator.sandbox.worker_process import Worker, fork_server_env

    limits = SandboxLimits(wall_s=300)
    cuda = args.device.startswith("cuda")
    dev = "cuda:0" if cuda else None
    res = {}
    server = ForkServer(fork_server_env())
    try:
        for start, via in (("fresh", None), ("forked", server)):
            for label, pre in (("bare", None), ("preload", workload_inputs(workload))):
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    w = Worker(limits, cuda, dev, pre, server=via)
                    ok = w.wait_ready(120)
                    times.append(time.perf_counter() - t0)
                    w.release()
                    assert ok and w.forked == (via is not None), w._reader.text()[-2000:]
                res[f"worker_ready_{label}_{start}_s"] = min(times[1:])  # the first forked one waits for the server's imports
    finally:
        server.close()
    return res


def parent_profile(workload: Any, seed: Path, repeat: int) -> dict[str, Any]:
    """The sandboxed score, its replacement spare started during the candidate (as the pool does)
    or after it, with and without the spare's kernel rehearsal, and with the parent's decoding and
    scoring the other way round from the device's default (after the worker, or alongside it);
    a profile of the parent for the first."""
    from evaluator.sandbox import runner

    out: dict[str, Any] = {}
    for rehearse in ("1", "0"):
        os.environ["ADRS_SPARE_REHEARSAL"] = rehearse
        for defer in (False, True):
            key = f"sandbox_s rehearse={rehearse} spare={'after' if defer else 'during'}"
            profile = rehearse == "1" and not defer
            out[key], out[key.replace("sandbox_s", "worker_s")], text, out[key.replace("sandbox_s", "worker_clock")] = \
                _pool_runs(workload, seed, repeat, defer, profile)
            if profile:
                out["profile"] = text
    os.environ.pop("ADRS_SPARE_REHEARSAL")
    # By default the parent decodes and scores as selections arrive on a GPU, after the worker on a
    # CPU (runner.score_after_worker); the other way round shows what that choice is worth.
    other = "alongside" if runner.score_after_worker(workload.records[0].queries.device) else "after"
    with flipped_scoring():
        key = f"sandbox_s rehearse=1 spare=after scoring={other}"
        out[key], out[key.replace("sandbox_s", "worker_s")], _, out[key.replace("sandbox_s", "worker_clock")] = \
            _pool_runs(workload, seed, repeat, True)
    return out


def _pool_runs(workload: Any, seed: Path, repeat: int, defer: bool, profile: bool = False) -> tuple[float, float, str, dict]:
    """Median seconds of a sandboxed score and of its worker's run, through a warmed pool whose
    replacement spare starts during the candidate or (``defer``) after it; with ``profile``, the
    parent's cProfile of the first timed score; the medians of the worker's own clock (its
    status's ``timing``: to the first masker call, that call, the rest)."""
    from evaluator.sandbox import SandboxLimits, WorkerPool, run_candidate

    cuda = str(workload.records[0].queries.device).startswith("cuda")
    times, worker, text, clocks = [], [], "", []
    with WorkerPool(SandboxLimits(wall_s=300), cuda=cuda) as pool:
        pool.defer_spares = defer
        run_candidate(seed, workload, 0.1, pool=pool)
        for i in range(repeat):
            pool.wait_ready(120)
            time.sleep(0.5)  # whatever the spare still does after saying ready
            prof = cProfile.Profile()
            if profile and i == 0:
                prof.enable()
            t, run = timed(lambda: run_candidate(seed, workload, 0.1, pool=pool))
            prof.disable()
            if profile and i == 0:
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
                text = s.getvalue()[-5000:]
            assert run.report.valid, run.report.reason
            times.append(t)
            worker.append(run.outcome.elapsed_s)
            clocks.append(run.outcome.status.get("timing") or {})
    timing = {k: statistics.median(c[k] for c in clocks if k in c) for k in clocks[0]} if clocks else {}
    return sorted(times)[len(times) // 2], sorted(worker)[len(worker) // 2], text, timing


def interference(args: argparse.Namespace, workload: Any, seed: Path) -> dict[str, float]:
    """The sandboxed score (its spare started after it) while other processes start beside it, one
    after another: which part of a spare's start-up slows a running candidate down."""
    import threading

    from evaluator.sandbox import SandboxLimits, WorkerPool, run_candidate
    from evaluator.sandbox.worker_process import Worker

    limits = SandboxLimits(wall_s=300)
    other = "cuda:1" if torch_device_count() > 1 else "cuda:0"
    plain = {
        "import torch": "import torch",
        "cuda init cuda:0": "import torch; torch.ones(1, device='cuda:0').sum().item()",
        f"cuda init {other}": f"import torch; torch.ones(1, device='{other}').sum().item()",
    }
    out: dict[str, float] = {}
    forked = {f"forked spare, inputs preloaded ({d})": d for d in dict.fromkeys(["cuda:0", other])}
    forked_bare = {f"forked spare, nothing preloaded ({other})": other}
    kinds = ["none", *plain, "sandbox worker (cpu)", f"sandbox worker ({other})", *forked, *forked_bare]
    kinds = [k for k in kinds if not args.kinds or any(k.startswith(want) for want in args.kinds)]
    from evaluator.sandbox.transport import workload_inputs

    inputs = workload_inputs(workload)
    with WorkerPool(limits, cuda=True) as pool:
        pool.defer_spares = True
        run_candidate(seed, workload, 0.1, pool=pool)
        for kind in kinds:
            stop = threading.Event()
            # The neighbours a scheduler's slots start: forked from a fork server, as many at once as --churn.
            neighbours = WorkerPool(limits, cuda=True, device=forked.get(kind) or forked_bare.get(kind), spares=1) \
                if kind in forked or kind in forked_bare else None
            if kind in forked:
                neighbours.prefetch(inputs, forked[kind])

            def churn() -> None:
                while not stop.is_set():
                    if kind in plain:
                        subprocess.run([sys.executable, "-c", plain[kind]], capture_output=True)
                    elif neighbours is not None:
                        w = Worker(limits, True, neighbours.device, inputs if kind in forked else None, neighbours._server)
                        w.wait_ready(120)
                        w.release()
                    elif kind.startswith("sandbox"):
                        dev = None if "cpu" in kind else other
                        w = Worker(limits, cuda=dev is not None, device=dev)
                        w.wait_ready(120)
                        w.release()
                    else:
                        return

            threads = [threading.Thread(target=churn, daemon=True) for _ in range(args.churn)]
            for bg in threads:
                bg.start()
            times = []
            for _ in range(args.repeat):
                pool.wait_ready(120)
                times.append(timed(lambda: run_candidate(seed, workload, 0.1, pool=pool))[0])
            stop.set()
            for bg in threads:
                bg.join(120)
            if neighbours is not None:
                neighbours.close()
            out[kind] = sorted(times)[len(times) // 2]
            print(f"  interference {kind}: {out[kind]:.3f} s", flush=True)
    return out


def torch_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workload", default="synthetic")
    ap.add_argument("--seeds", type=lambda s: s.split(","), default=["sink_window", "oracle_topk"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--interference", action="store_true", help="only: the score while other processes start beside it")
    ap.add_argument("--kinds", type=lambda s: s.split(","), default=None,
                    help="--interference: only the kinds of neighbour starting with these (comma-separated)")
    ap.add_argument("--churn", type=int, default=1, help="--interference: neighbours starting at once")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads here (and so in the workers)")
    ap.add_argument("--records", type=int, default=None, help="only the first N records (a quick look on a CPU)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_fast_score.json"))
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    workload = _workload(args.workload, args.device)
    if args.records:
        workload = dataclasses.replace(workload, records=workload.records[:args.records])
    result: dict[str, Any] = {"command": " ".join(sys.argv), "device": args.device, "workload": args.workload}
    if args.interference:
        result["interference"] = interference(args, workload, REPO / "seeds" / f"{args.seeds[0]}.py")
        Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)
        return
    result["worker_start"] = worker_start(args, workload)
    print(result["worker_start"], flush=True)
    for name in args.seeds:
        seed = REPO / "seeds" / f"{name}.py"
        r = {"stages": stages(workload, seed, args.repeat), "cold": cold_pass(args, seed, workload)}
        r.update(parent_profile(workload, seed, args.repeat))
        result[name] = r
        print(name, json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        print(r["profile"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
