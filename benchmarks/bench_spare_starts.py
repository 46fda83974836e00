"""How many GPU processes can start per second: the bound on making sandbox spares.

A scheduler slot uses up one warm spare worker per evaluation, so on N GPUs it can evaluate at
most as many candidates a second as spares can be made. Each spare is forked from a process
that imported torch (the fork server) and then pays, on its own: a CUDA context on its GPU, the
workload's inputs copied onto it, and the first launch of each kernel a masker uses. This times
exactly those three phases in ``--procs`` children forked at once from a torch-imported parent,
spread over ``--gpus`` GPUs, with every GPU visible to the child or only its own
(``CUDA_VISIBLE_DEVICES``), and prints the rate at which they become ready.

    python benchmarks/bench_spare_starts.py --procs 1 4 8 16 --gpus 1 2 --input-mb 385
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

# torch counts GPUs through NVML then: cudaGetDeviceCount would initialise the driver in this
# parent, and no child forked after that may use CUDA.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _child(gpu: int, visible: str, env: dict[str, str], host: torch.Tensor, write_fd: int) -> None:
    """One spare's GPU start-up, timed phase by phase; the times go down ``write_fd`` as JSON."""
    t0 = time.monotonic()
    os.environ.update(env)
    if visible == "own":
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    dev = torch.device("cuda", 0 if visible == "own" else gpu)
    torch.set_num_threads(2)  # as a spare warms up (evaluator/threads.py)
    torch.cuda.init()  # the driver (cuInit) and the runtime, no context yet
    t_init = time.monotonic()
    torch.cuda.set_device(dev)
    torch.ones(1, device=dev).sum().item()  # the context, and the first two kernels loaded
    t_ctx = time.monotonic()
    inputs = host.to(dev)
    torch.cuda.synchronize(dev)
    t_inputs = time.monotonic()
    # The kernels a masker typically launches first (warmup.py rehearses these on a spare).
    x = torch.randn(9, 32, 8192, device=dev)
    y = torch.softmax(x, -1)
    idx = y.topk(819, dim=-1).indices
    mask = torch.zeros_like(y, dtype=torch.bool).scatter_(-1, idx, True)
    (mask.cumsum(-1) + torch.sort(x, dim=-1).values).sum().item()
    t_kernels = time.monotonic()
    del inputs
    os.write(write_fd, json.dumps({"init": t_init - t0, "ctx": t_ctx - t_init, "inputs": t_inputs - t_ctx, "kernels": t_kernels - t_inputs,
                                   "ready": t_kernels - t0, "start": t0}).encode())
    os._exit(0)


def start_round(procs: int, gpus: int, visible: str, env: dict[str, str], host: torch.Tensor) -> dict:
    """Fork ``procs`` children at once over ``gpus`` GPUs; their phases and the round's rate."""
    pipes, pids = [], []
    t0 = time.monotonic()
    for i in range(procs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _child(i % gpus, visible, env, host, w)
            finally:
                os._exit(1)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    rows = []
    for r, pid in zip(pipes, pids):
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"a child failed (status {status})")
        rows.append(json.loads(data))
    makespan = max(row["start"] + row["ready"] for row in rows) - t0

    def median(key: str) -> float:
        vals = sorted(row[key] for row in rows)
        return vals[len(vals) // 2]

    return {"procs": procs, "gpus": gpus, "visible": visible, "env": env, "makespan_s": makespan, "ready_per_s": procs / makespan,
            **{f"{k}_median_s": median(k) for k in ("init", "ctx", "inputs", "kernels", "ready")},
            "ctx_max_s": max(row["ctx"] for row in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--visible", nargs="+", default=["all", "own"], choices=["all", "own"],
                    help="all GPUs visible to each child, or only its own (CUDA_VISIBLE_DEVICES)")
    ap.add_argument("--env", nargs="*", default=[""], metavar="KEY=VALUE[,KEY=VALUE]",
                    help="environment variants set in each child before CUDA starts ('' = none), e.g. "
                         "CUDA_DEVICE_MAX_CONNECTIONS=1")
    ap.add_argument("--input-mb", type=int, default=385, help="host bytes each child copies onto its GPU")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "spare_starts.json"))
    args = ap.parse_args()
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        sys.exit("run with every GPU visible: the children choose theirs")
    count = torch.cuda.device_count()  # NVML-based: no CUDA context in this (forking) parent
    if not count or torch.cuda.is_initialized():
        sys.exit("this benchmark needs a GPU and a parent without a CUDA context")
    host = torch.ones(args.input_mb << 20, dtype=torch.uint8)  # shared with the children by fork
    rows = []
    print(f"{'env':>24} {'procs':>5} {'gpus':>4} {'visible':>7} {'ready/s':>8} {'makespan':>9} {'init':>6} {'ctx':>6} {'ctx max':>7} "
          f"{'inputs':>6} {'kernels':>7} {'ready':>6}  (medians, s)")
    variants = [dict(kv.split("=", 1) for kv in text.split(",") if kv) for text in args.env]
    for env, visible, gpus, procs in itertools.product(variants, args.visible, [g for g in args.gpus if g <= count], args.procs):
        row = start_round(procs, gpus, visible, env, host)
        rows.append(row)
        print(f"{','.join(f'{k}={v}' for k, v in env.items()) or '-':>24} {procs:>5} {gpus:>4} {visible:>7} "
              f"{row['ready_per_s']:8.2f} {row['makespan_s']:9.2f} {row['init_median_s']:6.2f} {row['ctx_median_s']:6.2f} "
              f"{row['ctx_max_s']:7.2f} {row['inputs_median_s']:6.2f} {row['kernels_median_s']:7.2f} {row['ready_median_s']:6.2f}",
              flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "spare_starts", "command": " ".join(sys.argv),
                                              "input_mb": args.input_mb, "torch": torch.__version__,
                                              "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
