"""The sandbox worker: ``python -m evaluator.sandbox.worker CONTROL_FD LIMITS_JSON [PREP_JSON]``.

Started by ``evaluator.sandbox.launcher``, already inside its namespaces (or, under the explicit
opt-out, without them). Runs exactly one candidate, then exits. Order matters, and everything
before step 5 is trusted code:

1. rlimits: file size, no core dumps, task count (address space: in step 4, on top of what
   the prologue mapped);
2. import torch and friends (this is the slow part, done before the candidate's clock starts,
   so a warm spare worker can do it ahead of time), on the slot's GPU (``PREP_JSON``'s device);
   a spare told to (``preload``) then loads the workload's inputs, sent as an fd on the
   control socket, onto that device;
3. say "R" on the control socket; a spare that loaded nothing yet may then be sent a
   ``preload`` (it loads it and says "R" again); receive the job's files as fds there (the
   workload's inputs unless preloaded, the result pipe, or a session's pipes), then the job
   (JSON line, with the candidate's source) on stdin;
4. write the candidate into scratch (the cwd), map a session's shared device block if offered
   (``evaluator.sandbox.devshare``), drop to ``nobody`` (root only), audit hook;
5. load the candidate, run ``masker`` on every record, send each selection down the result
   pipe as soon as it is encoded (the parent scores while the next one is computed);
6. send the status (success or a categorised failure) last and exit; a session's worker
   writes ``status.json`` instead.

The parent trusts none of what this process writes: a candidate can rewrite any of it.
"""
from __future__ import annotations

import faulthandler
import importlib
import json
import os
import socket
import sys
import time

from evaluator.sandbox import preimports
from evaluator.sandbox.isolation import apply_rlimits, drop_privileges, install_audit_hook, is_root, limit_address_space
from evaluator.sandbox.failure_text import failure_status
from evaluator.sandbox.limits import SandboxLimits
from evaluator.sandbox.warmup import warm_encoder, warm_masker_ops, warm_seed_ops


def main() -> None:
    control, limits = socket.socket(fileno=int(sys.argv[1])), SandboxLimits.from_json(sys.argv[2])
    # What the pool knows before the job: the slot's device, and whether the workload's inputs
    # come ahead of the job (a warm spare loads them while no candidate waits).
    prep = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    cuda_job = os.environ.get("ADRS_SANDBOX_CUDA") == "1"
    # RLIMIT_NPROC binds a non-root uid; in our own user namespace it counts only the tasks
    # there (kernels >= 5.14), not all of the user's processes. As root it binds after the drop.
    in_userns = not is_root() and os.environ.get("ADRS_SANDBOX_LEVEL") == "namespaces"
    apply_rlimits(None, limits.output_bytes + (1 << 20), limits.nproc if is_root() or in_userns else None)
    faulthandler.enable()  # a segfault prints the Python stack to stderr for the report

    # Everything a masker may import must be imported now (see preimports; forked workers
    # find them loaded already).
    for name in preimports.MODULES:
        importlib.import_module(name)
    import torch

    if "threads" in prep:
        torch.set_num_threads(int(prep["threads"]))  # until the job's own count: see Worker's prep
    from evaluator import contract  # noqa: F401
    from evaluator.candidate import load_masker
    from evaluator.sandbox.devicepack import encode_selection_on_device
    from evaluator.sandbox.encode_batch import warm_batch_encoder
    from evaluator.sandbox.fast_worker import serve_records
    from evaluator.sandbox.transport import SESSION_PREFIX, InputReader, MappedTensors
    from evaluator.sandbox.channel import pack, write_blocking
    from evaluator.sandbox.session_worker import serve_session  # before the drop: imports may fail after
    from evaluator.sandbox.devshare import attach as attach_shared
    from safetensors.torch import save

    # Warm up the write path once, so nothing it lazily imports is needed after the drop.
    warm_encoder(encode_selection_on_device, save, "cpu")
    if cuda_job:
        if str(prep.get("device", "")).startswith("cuda:"):
            torch.cuda.set_device(prep["device"])  # the slot's GPU only: no context on GPU 0 for slot 1
        # CUDA context + cuBLAS before "ready": a warm spare then hands the candidate a live GPU.
        x = torch.ones(8, 8, device="cuda")
        (x @ x).sum().item()
        # The device encoder's kernels too: CUDA loads each kernel lazily on first use, which
        # would otherwise land on the first record, inside the candidate's clock.
        warm_encoder(encode_selection_on_device, save, "cuda")

    preloaded = None
    prefix_keys: dict[str, torch.Tensor] | None = None

    def preload(fd: int | None) -> None:
        """The workload's queries and keys (or a session's prefix keys) from ``fd`` onto the slot's
        device, before the job: the candidate's clock then starts at its first masker call."""
        nonlocal preloaded, prefix_keys
        mapped = MappedTensors(fd) if fd is not None else None
        if fd is not None:
            os.close(fd)  # the mapping stays valid
        if mapped is not None and mapped.metadata().get("kind") == SESSION_PREFIX:
            # A session's shared prefix keys: its key cache is filled from the device, not the file.
            prefix_keys = {name: mapped.get_tensor(name).to(prep["device"]) for name in mapped.keys()}
        elif mapped is not None:
            preloaded = InputReader(mapped, prep["device"]).records()
            if cuda_job and preloaded and prep.get("rehearse", True):
                # The kernels of the candidate's first record, loaded now rather than on its clock.
                first = preloaded[0]
                warm_encoder(encode_selection_on_device, save, str(first.queries.device), first.weights_shape)
                warm_batch_encoder(str(first.queries.device), first.weights_shape, first.keys.shape[1])
                warm_masker_ops(first)
                warm_seed_ops(first)
                torch.cuda.empty_cache()
        del mapped  # its tensors are copied out: the file's mapping is not the candidate's

    if prep.get("preload"):
        _, pre_fds, _, _ = socket.recv_fds(control, 1024, 1)
        preload(pre_fds[0] if pre_fds else None)
    control.send(b"R")
    # A spare started before its pool knew the workload may be told it while it waits (once).
    names_raw, fd_list, _, _ = socket.recv_fds(control, 64 * 1024, 8)
    if names_raw == b"preload" and "device" in prep:
        preload(fd_list[0] if fd_list else None)
        control.send(b"R")
        names_raw, fd_list, _, _ = socket.recv_fds(control, 64 * 1024, 8)
    files = dict(zip(json.loads(names_raw or b"[]"), fd_list))
    control.close()  # the candidate gets no channel to the parent but its results
    job = json.loads(sys.stdin.readline())
    job_received = time.perf_counter()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)

    scratch = os.getcwd()
    out, status_path = os.path.join(scratch, "out"), os.path.join(scratch, "status.json")
    name = os.path.basename(job["candidate_name"])
    if not name.endswith(".py") or name.startswith("."):
        name = "candidate.py"  # never collides with out/ or status.json
    candidate = os.path.join(scratch, name)
    with open(candidate, "w") as fh:
        fh.write(job["source"])
    job["candidate"] = candidate
    if "inputs" in files:
        records = InputReader(files.pop("inputs"), job["device"]).records()
    else:
        records = preloaded if job.get("preloaded") else None
    results = files.get("results")  # the fast score's selections stream back through this pipe
    torch.set_num_threads(int(job["num_threads"]))  # same threads as in process: same float results
    if job["device"].startswith("cuda"):
        if ":" in job["device"]:
            # A scheduler slot owns one GPU: the memory cap and bare "cuda" tensors go there, not to GPU 0.
            torch.cuda.set_device(job["device"])
        if limits.gpu_memory_fraction:
            torch.cuda.set_per_process_memory_fraction(limits.gpu_memory_fraction)
        # Initialise CUDA and load cuBLAS now: their libraries may be unreadable as nobody.
        x = torch.ones(8, 8, device=job["device"])
        (x @ x).sum().item()
    shared = None
    if "shared" in files:
        # Mapped now: after the drop and the audit hook, ctypes and the driver's device nodes may be closed to us.
        shared = attach_shared(files.pop("shared"), int(job["session"]["shared"]["bytes"]), job["device"])
    if not cuda_job:
        limit_address_space(limits.memory_mb)  # the driver reserves huge ranges on CUDA: no RLIMIT_AS there
    if is_root() and job.get("drop_privileges", True):
        drop_privileges()
    os.makedirs(out, exist_ok=True)

    def finish(status: dict) -> None:
        if results is not None:
            write_blocking(results, pack({"status": status}, {}))
        else:
            with open(status_path, "w") as fh:
                json.dump(status, fh)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    if limits.audit_hook:
        install_audit_hook(scratch)

    try:
        masker = load_masker(candidate)
    except BaseException as exc:  # noqa: BLE001 - anything at import time is the candidate's
        finish(failure_status(exc, candidate, "import"))
    if records is None:
        # Many calls over pipes (evaluator.sandbox.session); exits.
        serve_session(job, files, masker, finish, prefix_keys if job.get("prefix_preloaded") else None, shared)

    serve_records(job, records, masker, results, limits.output_bytes, finish, candidate, job_received)


if __name__ == "__main__":
    main()
