#!/usr/bin/env python3
"""Dataset-scale explanations: throughput on 1 and 2 processes, flat memory, HVP overhead.

- ``throughput``: examples/s of :func:`explain_dataset` with Integrated Hessians
  (softplus MLP d=32 -> 64 -> 64 -> 1, 8 path points, float32) and SmoothHess
  (256 samples) on the ReLU version (if ``captum_interactions.SmoothHess``
  exists), for 1 process and for 2 processes under ``torchrun`` (gloo on CPU;
  NCCL with one GPU per process on CUDA; with a single GPU both processes
  share it and reduce with gloo). On
  CPU: 1 process with all threads, then 1 and 2 processes with half the threads
  each; the speed-up compares runs with the same threads per process.
- ``memory``: peak RSS (``ru_maxrss`` of a fresh subprocess) of a 1k- and a
  10k-example run (d=64, chunks of 256), next to the size the per-example
  matrices would take if held in memory: it should stay flat.
- ``hvp_overhead``: Integrated Hessians time over the bare cost of its HVPs: one
  forward + create_graph backward on the same N x n_steps rows and one
  ``torch.autograd.grad(..., is_grads_batched=True)`` over the same D directions
  (target <= 1.5x).

    python benchmarks/bench_dataset.py [--device cuda] [--quick]

Prints a table and writes ``benchmarks/results/dataset_<device>.json``.
"""
import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from _common import device_name, sync, timed, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def mlp(d, hidden, activation, device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, hidden), activation(), nn.Linear(hidden, hidden), activation(),
        nn.Linear(hidden, 1),
    ).to(device)


def make_method(name, d, device):
    import captum_interactions

    if name == "IntegratedHessians":
        model = mlp(d, 64, lambda: nn.Softplus(beta=2.0), device)
        return captum_interactions.IntegratedHessians(model), {"n_steps": 8}
    if name == "SmoothHess":
        model = mlp(d, 64, nn.ReLU, device)
        return captum_interactions.SmoothHess(model), {"stdevs": 0.1, "n_samples": 256}
    raise ValueError(name)


# ---------------------------------------------------------------- worker mode
def worker(config):
    """One explain_dataset run (a rank under torchrun, or a plain process)."""
    args = argparse.Namespace(**config)
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    from captum_interactions import explain_dataset

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    device = args.device
    backend = None
    if distributed:
        backend = "gloo"
        if device.startswith("cuda"):
            # NCCL needs one GPU per rank; ranks sharing a GPU reduce with gloo
            gpu = int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count()
            torch.cuda.set_device(gpu)
            device = f"cuda:{gpu}"
            if torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"]):
                backend = "nccl"
        dist.init_process_group(backend)
    torch.set_num_threads(args.threads)
    rank = dist.get_rank() if distributed else 0
    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method, kwargs = make_method(args.method, args.d, device)
    torch.manual_seed(1)
    x = torch.randn(args.n, args.d)  # the dataset lives on the host, as usual
    loader = DataLoader(TensorDataset(x), batch_size=args.batch_size)
    small = DataLoader(TensorDataset(x[: args.batch_size]), batch_size=args.batch_size)
    explain_dataset(method, small, args.out_dir + "_warmup", kwargs, progress=False, resume=False)
    if distributed:
        dist.barrier()
    sync(device)
    start = time.perf_counter()
    result = explain_dataset(
        method, loader, args.out_dir, kwargs, chunk_size=args.chunk_size,
        progress=False, resume=False,
    )
    sync(device)
    seconds = time.perf_counter() - start
    if rank == 0:
        report = dict(
            seconds=seconds,
            examples=len(result),
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            rss_after_setup_mb=rss_setup / 1024,
            threads=torch.get_num_threads(),
            backend=backend,
        )
        with open(args.report, "w") as fh:
            json.dump(report, fh)
    if distributed:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc, method, n, d, device, threads, chunk_size=256, batch_size=64):
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        # the worker's settings travel in the environment: torchrun's own parser
        # would take worker flags such as --n for its own (prefix matching)
        config = dict(
            method=method, n=n, d=d, device=device, threads=threads, chunk_size=chunk_size,
            batch_size=batch_size, out_dir=os.path.join(tmp, "out"), report=report,
        )
        worker_args = [os.path.abspath(__file__)]
        if nproc == 1:
            cmd = [sys.executable] + worker_args
        else:
            cmd = [
                sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            ] + worker_args
        env = dict(
            os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(threads),
            BENCH_DATASET_WORKER=json.dumps(config),
        )
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            # torchrun ends stderr with its own summary; the ranks' exceptions
            # come before it, one "[rankN]: ...Error: ..." line each
            errors = [line for line in proc.stderr.splitlines()
                      if re.match(r"(\[rank\d+\]: )?\w+(Error|Exception|Interrupt)\b", line)]
            raise RuntimeError("\n".join(errors) or proc.stderr[-2000:])
        with open(report) as fh:
            return json.load(fh)


# ---------------------------------------------------------------- HVP overhead
def hvp_overhead(device, n, d, n_steps=8, repeats=5):
    from captum_interactions import IntegratedHessians
    from captum_interactions._utils.quadrature import gauss_log_rule

    model = mlp(d, 64, lambda: nn.Softplus(beta=2.0), device)
    torch.manual_seed(2)
    x = torch.randn(n, d, device=device)
    ih = IntegratedHessians(model)
    nodes, _ = gauss_log_rule(n_steps)
    t = torch.tensor(nodes, device=device, dtype=x.dtype)
    eye = torch.eye(d, device=device, dtype=x.dtype)

    def bare():
        # the physical minimum: gradient with graph on the same rows, then D HVPs batched
        rows = (t.view(-1, 1, 1) * x).reshape(-1, d).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(rows).sum(), rows, create_graph=True)
        directions = eye[:, None, :].expand(d, rows.shape[0], d)
        return torch.autograd.grad(grad, rows, directions, is_grads_batched=True)[0]

    def ours():
        return ih.attribute(x, n_steps=n_steps)

    bare(), ours()  # warm-up
    t_bare, t_ours = timed(bare, device, repeats)[0], timed(ours, device, repeats)[0]
    return dict(n=n, d=d, n_steps=n_steps, hvps=n * n_steps * d, ih_seconds=t_ours,
                bare_hvp_seconds=t_bare, overhead=t_ours / t_bare)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller datasets")
    parser.add_argument("--out", default=None)
    if "BENCH_DATASET_WORKER" in os.environ:
        return worker(json.loads(os.environ["BENCH_DATASET_WORKER"]))
    args = parser.parse_args()

    device = args.device
    cores = max(1, torch.get_num_threads())
    methods = ["IntegratedHessians"]
    notes = []
    try:
        from captum_interactions import SmoothHess  # noqa: F401

        methods.append("SmoothHess")
    except ImportError:
        notes.append("SmoothHess not importable: its throughput rows are skipped")
    n_throughput = 1024 if args.quick else 4096
    # (processes, threads per process): 1 process with all cores, then 1 and 2
    # processes with the same threads each (the scaling the speed-up reports)
    if device.startswith("cuda"):
        configs = [(1, cores), (2, cores)]
        if torch.cuda.device_count() < 2:
            notes.append("one GPU visible: the 2 processes share it and reduce with gloo "
                         "(NCCL needs one GPU per rank)")
    else:
        per_process = max(1, cores // 2)
        configs = [(1, cores), (1, per_process), (2, per_process)]
        if cores == per_process:
            configs = configs[1:]
    throughput = []
    for method in methods:
        for nproc, threads in configs:
            try:
                rep = launch(nproc, method, n_throughput, 32, device, threads)
            except RuntimeError as err:
                throughput.append(dict(method=method, processes=nproc,
                                       threads_per_process=threads, error=str(err)[-300:]))
                continue
            throughput.append(dict(
                method=method, processes=nproc, threads_per_process=threads,
                backend=rep.get("backend"),
                examples=rep["examples"], seconds=rep["seconds"],
                examples_per_s=rep["examples"] / rep["seconds"],
            ))
    for row in throughput:
        one = next((r for r in throughput if r["method"] == row["method"] and "seconds" in r
                    and r["processes"] == 1
                    and r["threads_per_process"] == row.get("threads_per_process")), None)
        if "seconds" in row and one:
            row["speedup_vs_1_process"] = one["seconds"] / row["seconds"]

    memory = []
    sizes = (1000, 4000) if args.quick else (1000, 10000)
    for n in sizes:
        rep = launch(1, "IntegratedHessians", n, 64, device, cores)
        memory.append(dict(
            examples=n, peak_rss_mb=rep["peak_rss_mb"],
            rss_after_setup_mb=rep["rss_after_setup_mb"],
            matrices_if_held_mb=n * 64 * 64 * 4 / 2**20, seconds=rep["seconds"],
        ))
    overhead = [hvp_overhead(device, n, d) for n, d in ((64, 16), (64, 64))]

    print(f"explain_dataset, device={device}, {cores} threads available")
    print(f"{'method':<20} {'procs':>5} {'threads':>7} {'examples':>8} {'seconds':>8} "
          f"{'ex/s':>8} {'vs 1 proc':>9}")
    for r in throughput:
        if "error" in r:
            print(f"{r['method']:<20} {r['processes']:>5} failed: " + " | ".join(r["error"].splitlines()))
            continue
        print(f"{r['method']:<20} {r['processes']:>5} {r['threads_per_process']:>7} "
              f"{r['examples']:>8} {r['seconds']:>8.2f} {r['examples_per_s']:>8.1f} "
              f"{r.get('speedup_vs_1_process', 1):>9.2f}")
    print(f"\n{'examples':>8} {'peak RSS MB':>11} {'RSS setup MB':>12} {'held would be MB':>16}")
    for r in memory:
        print(f"{r['examples']:>8} {r['peak_rss_mb']:>11.1f} {r['rss_after_setup_mb']:>12.1f} "
              f"{r['matrices_if_held_mb']:>16.1f}")
    print(f"\n{'N':>4} {'d':>4} {'HVPs':>7} {'IH s':>9} {'bare HVP s':>10} {'overhead':>8}")
    for r in overhead:
        print(f"{r['n']:>4} {r['d']:>4} {r['hvps']:>7} {r['ih_seconds']:>9.4f} "
              f"{r['bare_hvp_seconds']:>10.4f} {r['overhead']:>8.2f}")
    for note in notes:
        print("note:", note)

    result = dict(
        benchmark="dataset",
        device=device,
        device_name=device_name(device),
        torch=torch.__version__,
        threads=cores,
        throughput=throughput,
        memory=memory,
        hvp_overhead=overhead,
        notes=notes,
    )
    out = args.out or os.path.join(HERE, "results", f"dataset_{device.split(':')[0]}.json")
    write_results(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
