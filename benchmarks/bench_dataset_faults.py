#!/usr/bin/env python3
"""Fault injection for :func:`explain_dataset`: kills, damaged files, changed runs,
and the cost of fingerprints and checksums.

- ``kills``: K SIGKILLs at random points of a run (each after at least one new
  chunk, then a random 0-0.5 s), then a rerun to the end; the result must be
  bit-identical (``torch.equal``, per-example matrices and summaries) to an
  uninterrupted run.
- ``faults``: one fault at a time on a finished run (changed weights, buffers,
  method setting, data, labels; swapped, foreign, bit-flipped, truncated and
  empty chunks; a manifest that is not JSON or has ``num_chunks`` edited; a
  summary deleted; a NaN example; a second run on a live folder; an old-format
  folder). For each: what reading the result does, what a rerun does, how many
  examples it recomputes, and whether the final result equals the clean one.
- ``overhead``: examples/s with hashing (model fingerprint, per-chunk input
  hashes, per-tensor SHA-256 of every file written and read back for the
  summary) and with hashing switched off, alternating in the same process,
  median of ``--repeats`` runs each; plus the cost of ``verify()`` (reading and
  checking every chunk) and of a resume of a finished run (which re-reads and
  re-checks all chunks and re-hashes the data).

    python benchmarks/bench_dataset_faults.py [--kills 8] [--repeats 5] [--quick]

Prints tables and writes ``benchmarks/results/dataset_faults.json``.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from _common import device_name, write_results  # noqa: E402

import captum_interactions._utils.dataset_storage as storage  # noqa: E402
from captum_interactions import ExpectedHessians, IntegratedHessians, explain_dataset  # noqa: E402
from captum_interactions._core.dataset import DatasetExplanation  # noqa: E402

# ---------------------------------------------------------------- kills
KILL_PROBLEM = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from captum_interactions import ExpectedHessians, explain_dataset

    def problem(n, d):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d, 64), nn.Softplus(), nn.Linear(64, 64), nn.Softplus(),
                              nn.Linear(64, 1))
        x = torch.randn(n, d)
        background = torch.randn(32, d)
        return ExpectedHessians(model), DataLoader(TensorDataset(x), batch_size=25), background

    if __name__ == "__main__":
        torch.set_num_threads(1)
        n, d, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        method, loader, background = problem(n, d)
        explain_dataset(method, loader, out_dir, {"baselines": background, "n_samples": 64},
                        chunk_size=50, seed=11, dependence_pairs=[(0, 1)], progress=False)
    """
)


def _chunks_on_disk(out_dir):
    folder = os.path.join(out_dir, "chunks")
    if not os.path.isdir(folder):
        return 0
    return sum(n.endswith(".safetensors") for n in os.listdir(folder))


def kills(num_kills, n, d, tmp):
    script = os.path.join(tmp, "kill_problem.py")
    with open(script, "w") as fh:
        fh.write(KILL_PROBLEM)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    reference = os.path.join(tmp, "uninterrupted")
    start = time.perf_counter()
    subprocess.run([sys.executable, script, str(n), str(d), reference], env=env, check=True)
    reference_seconds = time.perf_counter() - start
    killed = os.path.join(tmp, "killed")
    rng = random.Random(1234)
    log = []
    for k in range(num_kills):
        before = _chunks_on_disk(killed)
        proc = subprocess.Popen([sys.executable, script, str(n), str(d), killed], env=env)
        while proc.poll() is None and _chunks_on_disk(killed) <= before:
            time.sleep(0.005)
        delay = rng.uniform(0.0, 0.5)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.append(dict(kill=k + 1, chunks_before=before, chunks_after=_chunks_on_disk(killed),
                        delay_after_new_chunk_s=round(delay, 3), finished_before_kill=finished))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        proc = subprocess.run([sys.executable, script, str(n), str(d), killed], env=env,
                              capture_output=True, text=True)
    a, b = DatasetExplanation.load(reference), DatasetExplanation.load(killed)
    identical = dict(
        interactions=torch.equal(a.interactions(), b.interactions()),
        mean_interactions=torch.equal(a.mean_interactions, b.mean_interactions),
        mean_abs_interactions=torch.equal(a.mean_abs_interactions, b.mean_abs_interactions),
        top_pairs=a.top_pairs == b.top_pairs,
        dependence=torch.equal(a.dependence[(0, 1)]["interaction"],
                               b.dependence[(0, 1)]["interaction"]),
    )
    return dict(examples=n, features=d, chunks=a.num_chunks, method="ExpectedHessians",
                uninterrupted_seconds=reference_seconds, kills=log,
                final_rerun_returncode=proc.returncode,
                final_rerun_warnings=proc.stderr.count("RuntimeWarning"),
                bit_identical=identical, all_identical=all(identical.values()))


# ---------------------------------------------------------------- faults
N, D, CHUNK = 40, 4, 8
SETTINGS = dict(chunk_size=CHUNK, progress=False)
KWARGS = {"n_steps": 4, "target": 0}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Softplus(),
                         nn.Linear(8, 2)).double().eval()


def _data():
    torch.manual_seed(1)
    return torch.randn(N, D, dtype=torch.float64)


def _run(out, model=None, x=None, method=None, **extra):
    model = _model() if model is None else model
    x = _data() if x is None else x
    method = IntegratedHessians(model) if method is None else method
    inner, count = method.attribute, [0]

    def counting(inputs, *args, **kwargs):
        count[0] += inputs.shape[0]
        return inner(inputs, *args, **kwargs)

    method.attribute = counting
    result = explain_dataset(method, DataLoader(TensorDataset(x), batch_size=4), out, KWARGS,
                             **dict(SETTINGS, **extra))
    return result, count[0]


def _chunk(out, c):
    return storage.chunk_path(out, c)


def _outcome(fn):
    """(what happened, examples recomputed, result) of ``fn``, never raising."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - reported in the table
            return f"{type(err).__name__}: {err}", None, None
    said = "; ".join(f"{w.category.__name__}: {w.message}" for w in caught
                     if issubclass(w.category, RuntimeWarning))
    if isinstance(value, tuple):
        return said or "ok, no warning", value[1], value[0]
    return said or "ok, no warning", None, value


def _flip(path, count, seed):
    data = bytearray(open(path, "rb").read())
    for p in random.Random(seed).sample(range(len(data)), count):
        data[p] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path, size):
    with open(path, "r+b") as fh:
        fh.truncate(size)


def faults(tmp):
    clean_dir = os.path.join(tmp, "clean")
    clean, _ = _run(clean_dir)
    clean_values = clean.interactions()
    rows = []

    def case(name, damage, rerun=None, expect_refusal=False, named=None):
        out = os.path.join(tmp, name.replace(" ", "_"))
        shutil.copytree(clean_dir, out)
        path = damage(out)
        named = named or path
        load, _, loaded = _outcome(lambda: DatasetExplanation.load(out).interactions())
        if path is None:  # the fault is in the rerun's model, data or timing
            load = "n/a"
        elif loaded is not None:
            load = ("silently returned " + ("the clean result" if torch.equal(loaded, clean_values)
                                             else "WRONG values"))
        rerun_text, recomputed, result = _outcome(rerun or (lambda: _run(out)))
        repaired = None
        if result is not None:
            repaired = bool(torch.equal(result.interactions(), clean_values)) if name not in (
                "NaN example",) else result.nonfinite_examples == [13]
        rows.append(dict(
            fault=name, file=os.path.relpath(path, out) if path else None,
            on_load=load[:300], named=named,
            path_named=bool(named) and (named in load or named in rerun_text),
            on_rerun=rerun_text[:300], refused=expect_refusal and result is None,
            examples_recomputed=recomputed, repaired=repaired,
        ))

    def changed_weights(out):
        return None

    model2 = _model()
    with torch.no_grad():
        model2[3].weight[1, 2] += 1e-6
    case("changed weights", changed_weights, lambda: _run(os.path.join(tmp, "changed_weights"),
                                                          model=model2), True,
         "model parameters differ (layer '3.weight')")
    model3 = _model()
    model3[1].running_mean[0] += 1e-6
    case("changed buffer", changed_weights, lambda: _run(os.path.join(tmp, "changed_buffer"),
                                                         model=model3), True,
         "model buffers differ (layer '1.running_mean')")
    case("changed method setting", changed_weights,
         lambda: _run(os.path.join(tmp, "changed_method_setting"),
                      method=IntegratedHessians(_model(), multiply_by_inputs=False)), True,
         "method setting 'multiply_by_inputs' (was true, now false)")
    x2 = _data()
    x2[27, 1] += 1e-9
    case("changed data", changed_weights,
         lambda: _run(os.path.join(tmp, "changed_data"), x=x2), True,
         "inputs of chunk 3 (examples 24–31) differ")
    case("swapped chunks", lambda out: (os.replace(_chunk(out, 1), _chunk(out, 1) + ".x"),
                                        os.replace(_chunk(out, 2), _chunk(out, 1)),
                                        os.replace(_chunk(out, 1) + ".x", _chunk(out, 2)),
                                        _chunk(out, 1))[-1])
    other_dir = os.path.join(tmp, "other_run")
    _run(other_dir, model=_model(seed=5))

    def foreign(out):
        shutil.copy(_chunk(other_dir, 3), _chunk(out, 3))
        return _chunk(out, 3)

    case("foreign chunk", foreign)
    case("64 flipped bytes", lambda out: (_flip(_chunk(out, 2), 64, 0), _chunk(out, 2))[1])
    case("truncated chunk", lambda out: (_truncate(_chunk(out, 0),
                                                   os.path.getsize(_chunk(out, 0)) // 2),
                                         _chunk(out, 0))[1])
    case("empty chunk", lambda out: (_truncate(_chunk(out, 4), 0), _chunk(out, 4))[1])

    def manifest_not_json(out):
        path = os.path.join(out, "manifest.json")
        text = open(path).read()
        open(path, "w").write(text[: len(text) // 2])
        return path

    def num_chunks_edited(out):
        path = os.path.join(out, "manifest.json")
        manifest = json.load(open(path))
        manifest["num_chunks"] = 2
        json.dump(manifest, open(path, "w"))
        return path

    case("manifest not JSON", manifest_not_json)
    case("num_chunks edited", num_chunks_edited)
    case("summary deleted", lambda out: (os.remove(os.path.join(out, "summary.json")),
                                         os.path.join(out, "summary.json"))[1])

    x_nan = _data()

    class NaNAt13(IntegratedHessians):
        def attribute(self, inputs, **kwargs):
            out = super().attribute(inputs, **kwargs).clone()
            out[(inputs[:, 0] > 50)] = float("nan")
            return out

    x_nan[13, 0] = 100.0

    def nan_run():
        out = os.path.join(tmp, "nan_run")
        result, count = _run(out, x=x_nan, method=NaNAt13(_model()), resume=False)
        finite_summary = bool(result.mean_abs_interactions.isfinite().all())
        return (result if finite_summary else None), count

    case("NaN example", changed_weights, nan_run, named="(examples 13)")

    def concurrent(out):
        return None

    def second_run_while_live():
        out = os.path.join(tmp, "live")
        holder = textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {HERE!r})
            import bench_dataset_faults as b
            from captum_interactions import IntegratedHessians
            m = IntegratedHessians(b._model()); inner = m.attribute
            def slow(*a, **k):
                time.sleep(0.1)
                return inner(*a, **k)
            m.attribute = slow
            b._run({out!r}, method=m)
            """
        )
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-c", holder], env=env)
        while proc.poll() is None and _chunks_on_disk(out) < 1:
            time.sleep(0.01)
        try:
            return _run(out, resume=False, lock_timeout=0.1)
        finally:
            live_ok = proc.wait() == 0 and DatasetExplanation.load(out) is not None
            rows_note["live run finished"] = live_ok

    rows_note = {}
    case("second run on a live folder (resume=False)", concurrent, second_run_while_live, True,
         "is in use by another run")
    rows[-1]["note"] = f"the live run finished intact: {rows_note.get('live run finished')}"

    def old_format(out):
        shutil.rmtree(out)
        os.makedirs(os.path.join(out, "chunks"))
        json.dump({"version": 1, "settings": {}, "num_chunks": 5, "complete": True},
                  open(os.path.join(out, "manifest.json"), "w"))
        torch.save({"interactions": torch.zeros(1)}, os.path.join(out, "chunks",
                                                                  "chunk_000000.pt"))
        open(os.path.join(out, ".lock"), "w").close()
        return os.path.join(out, "manifest.json")

    case("old-format folder", old_format, None, True)
    return rows


# ---------------------------------------------------------------- overhead
class _HashClock:
    """CPU seconds spent in the hashing entry points (per-tensor SHA-256, which
    the model fingerprint and the file checksums use, and the inputs hasher)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start

        return timed


def overhead(n, d, repeats, tmp):
    """Same process, one thread, alternating runs with and without hashing.
    CPU time (``time.process_time``) is the figure: wall time on a machine
    shared with other jobs varies by more than the effect measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 64), nn.Softplus(beta=2.0), nn.Linear(64, 64),
                          nn.Softplus(beta=2.0), nn.Linear(64, 1))
    x = torch.randn(n, d)
    loader = DataLoader(TensorDataset(x), batch_size=64)
    method = IntegratedHessians(model)
    out = os.path.join(tmp, "overhead")
    clock = _HashClock()
    saved = (storage.tensor_sha256, storage.InputsHasher.update)
    storage.tensor_sha256 = clock.wrap(saved[0])
    storage.InputsHasher.update = clock.wrap(saved[1])

    def run():
        clock.seconds = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        result = explain_dataset(method, loader, out, {"n_steps": 8}, chunk_size=256,
                                 progress=False, resume=False)
        return dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                    hashing_cpu=clock.seconds), result

    try:
        run()  # warm-up
        runs = {True: [], False: []}
        for r in range(repeats):
            for hashing in ((True, False) if r % 2 == 0 else (False, True)):
                storage._HASHING = hashing
                try:
                    runs[hashing].append(run()[0])
                finally:
                    storage._HASHING = True
        _, result = run()
        start = time.process_time()
        result.verify()
        verify_s = time.process_time() - start
        start = time.process_time()
        explain_dataset(method, loader, out, {"n_steps": 8}, chunk_size=256, progress=False)
        resume_s = time.process_time() - start
    finally:
        storage.tensor_sha256, storage.InputsHasher.update = saved
        torch.set_num_threads(threads)

    def median(values):
        return sorted(values)[len(values) // 2]

    cpu = {k: median([r["cpu"] for r in v]) for k, v in runs.items()}
    wall = {k: median([r["wall"] for r in v]) for k, v in runs.items()}
    share = median([r["hashing_cpu"] / r["cpu"] for r in runs[True]])
    return dict(
        method="IntegratedHessians", examples=n, features=d, n_steps=8, chunk_size=256,
        batch_size=64, threads=1, repeats=repeats, runs_with_hashing=runs[True],
        runs_without_hashing=runs[False],
        median_cpu_with=cpu[True], median_cpu_without=cpu[False],
        median_wall_with=wall[True], median_wall_without=wall[False],
        examples_per_cpu_s_with=n / cpu[True], examples_per_cpu_s_without=n / cpu[False],
        overhead_cpu=cpu[True] / cpu[False] - 1, overhead_wall=wall[True] / wall[False] - 1,
        hashing_share_of_cpu=share,
        verify_cpu_seconds=verify_s, resume_of_finished_run_cpu_seconds=resume_s,
        bytes_on_disk=sum(os.path.getsize(os.path.join(out, "chunks", f))
                          for f in os.listdir(os.path.join(out, "chunks"))),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "dataset_faults.json"))
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_dataset_faults_")
    try:
        kill_report = kills(args.kills, 600 if args.quick else 1500, 16, tmp)
        fault_rows = faults(tmp)
        cost = overhead(512 if args.quick else 1024, 32, args.repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nK = {args.kills} SIGKILLs during a {kill_report['examples']}-example "
          f"ExpectedHessians run ({kill_report['chunks']} chunks; uninterrupted "
          f"{kill_report['uninterrupted_seconds']:.1f} s)")
    print(f"{'kill':>4} {'chunks before':>13} {'after':>6} {'delay s':>8}")
    for k in kill_report["kills"]:
        print(f"{k['kill']:>4} {k['chunks_before']:>13} {k['chunks_after']:>6} "
              f"{k['delay_after_new_chunk_s']:>8.3f}"
              + ("  (finished first)" if k["finished_before_kill"] else ""))
    print("final result bit-identical to the uninterrupted run:", kill_report["bit_identical"])

    print(f"\n{'fault':<44} {'named':>5} {'recomputed':>10} {'repaired':>8}  outcome "
          "(of reading the result; of the rerun where the fault is in the rerun)")
    for r in fault_rows:
        outcome = r["on_load"] if r["on_load"] != "n/a" else r["on_rerun"]
        repaired = "refused" if r["refused"] else str(r["repaired"])
        print(f"{r['fault']:<44} {str(r['path_named']):>5} "
              f"{str(r['examples_recomputed']):>10} {repaired:>8}  {outcome[:110]}")

    print(f"\nfingerprints + checksums: {cost['examples']} examples, d={cost['features']}, "
          f"1 thread, median of {cost['repeats']} alternating runs each (CPU seconds; wall "
          "seconds in brackets, noisy on a shared machine)")
    print(f"  with hashing    {cost['median_cpu_with']:.3f} s ({cost['median_wall_with']:.3f} s)"
          f"  {cost['examples_per_cpu_s_with']:.0f} ex per CPU s")
    print(f"  without hashing {cost['median_cpu_without']:.3f} s "
          f"({cost['median_wall_without']:.3f} s)  {cost['examples_per_cpu_s_without']:.0f} ex "
          "per CPU s")
    print(f"  overhead {100 * cost['overhead_cpu']:+.1f} % CPU "
          f"({100 * cost['overhead_wall']:+.1f} % wall); time inside the hash functions "
          f"{100 * cost['hashing_share_of_cpu']:.2f} % of the run's CPU; verify() "
          f"{cost['verify_cpu_seconds']:.3f} s, resume of a finished run "
          f"{cost['resume_of_finished_run_cpu_seconds']:.3f} s")

    write_results(dict(
        benchmark="dataset_faults", device="cpu", device_name=device_name("cpu"),
        torch=torch.__version__, note="2-core machine shared with other jobs (contended)",
        kills=kill_report, faults=fault_rows, overhead=cost,
    ), args.out)
    return 0 if kill_report["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
