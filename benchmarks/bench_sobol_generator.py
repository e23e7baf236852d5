#!/usr/bin/env python3
"""SmoothHess's Sobol points: the batched scramble against one SobolEngine per example.

The "sobol" sampler needs an independently scrambled Sobol sequence per example
and noise block. Until this change each came from its own
``torch.quasirandom.SobolEngine(D, scramble=True)``; now
``captum_interactions._utils.sobol.scrambled_sobol`` scrambles all of them at
once (the same kind of scramble: a random linear matrix and a digital shift).

- Generation time for (points, sequences, dimension) shapes of a SmoothHess
  block, both ways, in the same run (medians of 5).
- SmoothHess with ``sampler="sobol"`` on the closed forms of
  ``bench_smooth_hess_samplers.py`` in 2 dimensions (relu(x1) relu(x2),
  max(x1, x2)) and a sum of ReLUs in 8: root-mean-square relative error over
  repeats with each generator (same settings, same seeds; the two generators
  draw different random bits, so the errors agree up to their spread), and
  the time per call.
- The default call (``SmoothHess(model).attribute(x)``, Sobol below 17
  features) on a small MLP wrapped so that no first-layer structure is used.

Prints a table and writes ``benchmarks/results/sobol_generator.json``.

    python benchmarks/bench_sobol_generator.py [--repeats 200]
"""
import argparse
import math
import os
import statistics
import time

import torch
from torch import nn

from captum_interactions import SmoothHess
from captum_interactions._utils import stein
from captum_interactions._utils.sobol import scrambled_sobol
from _common import write_results  # noqa: E402
from bench_smooth_hess_samplers import _phi, closed_forms  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def engines(num_points, num_sequences, dimension):
    """The previous generator: one scrambled SobolEngine per sequence."""
    seeds = torch.randint(0, 2**62, (num_sequences,)).tolist()
    return torch.stack(
        [torch.quasirandom.SobolEngine(dimension, scramble=True, seed=seed).draw(
            num_points, dtype=torch.float64) for seed in seeds],
        dim=1,
    )


def median_time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relu_sum_8(dtype):
    gen = torch.Generator().manual_seed(8)
    d, k, sigma = 8, 16, 0.5
    w = torch.randn(k, d, generator=gen, dtype=dtype) / math.sqrt(d)
    b = 0.5 * torch.randn(k, generator=gen, dtype=dtype)
    a = torch.randn(k, generator=gen, dtype=dtype)
    x = torch.randn(4, d, generator=gen, dtype=dtype)
    s = sigma * w.norm(dim=1)
    truth = torch.einsum("k,nk,ki,kj->nij", a, _phi((x @ w.T + b) / s) / s, w, w)
    return "relu_sum (d=8)", (lambda v: torch.relu(v @ w.T + b) @ a), x, sigma, truth


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--calls", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "sobol_generator.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    generators = {"SobolEngine per example": engines, "batched scramble": scrambled_sobol}

    shapes = [(32, 20, 10), (88, 20, 10), (32, 200, 16), (128, 64, 2)]
    generation = []
    for shape in shapes:
        row = dict(points=shape[0], sequences=shape[1], dimension=shape[2])
        for name, fn in generators.items():
            fn(*shape)  # warm-up
            row[name] = median_time(lambda: fn(*shape))
        row["speed-up"] = row["SobolEngine per example"] / row["batched scramble"]
        generation.append(row)

    cases = [c[:5] for c in closed_forms("cpu", torch.float64) if c[0] in
             ("relu_product (d=2)", "max (d=2)")] + [relu_sum_8(torch.float64)]
    estimates = []
    try:
        for name, forward, x, sigma, truth in cases:
            row = dict(case=name, calls=args.calls, repeats=args.repeats)
            for label, fn in generators.items():
                stein.scrambled_sobol = fn  # the generator draw_noise calls
                sh = SmoothHess(forward)
                errors, start = [], time.perf_counter()
                for r in range(args.repeats):
                    torch.manual_seed(1000 + r)
                    h = sh.attribute(x, n_samples=args.calls, stdevs=sigma, sampler="sobol")
                    errors.append(((h - truth).flatten(1).norm(dim=1)
                                   / truth.flatten(1).norm(dim=1)) ** 2)
                row[label] = dict(
                    rms_relative_error=torch.stack(errors).mean().sqrt().item(),
                    seconds_per_call=(time.perf_counter() - start) / args.repeats,
                )
            row["error ratio (batched / engines)"] = (
                row["batched scramble"]["rms_relative_error"]
                / row["SobolEngine per example"]["rms_relative_error"])
            estimates.append(row)

        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                            nn.Linear(32, 1))
        x = torch.randn(20, 10)
        default = dict(case="default call, 10-32-32-1 ReLU MLP (as a plain function), 20 examples")
        for label, fn in generators.items():
            stein.scrambled_sobol = fn  # the generator draw_noise calls
            sh = SmoothHess(lambda v: mlp(v))
            sh.attribute(x)
            default[label] = median_time(lambda: sh.attribute(x))
        default["speed-up"] = default["SobolEngine per example"] / default["batched scramble"]
    finally:
        stein.scrambled_sobol = scrambled_sobol

    print("generation (s): points x sequences x dimension | engines | batched | speed-up")
    for row in generation:
        print(f"  {row['points']} x {row['sequences']} x {row['dimension']}: "
              f"{row['SobolEngine per example']:.4f} | {row['batched scramble']:.4f} | "
              f"{row['speed-up']:.1f}x")
    print(f"SmoothHess, sampler='sobol', {args.calls} calls, {args.repeats} repeats: "
          "rms relative error engines | batched | ratio; ms per call engines | batched")
    for row in estimates:
        e, b = row["SobolEngine per example"], row["batched scramble"]
        print(f"  {row['case']}: {e['rms_relative_error']:.4f} | {b['rms_relative_error']:.4f} | "
              f"{row['error ratio (batched / engines)']:.3f}; "
              f"{e['seconds_per_call'] * 1e3:.1f} | {b['seconds_per_call'] * 1e3:.1f}")
    print(f"{default['case']}: {default['SobolEngine per example'] * 1e3:.1f} ms -> "
          f"{default['batched scramble'] * 1e3:.1f} ms ({default['speed-up']:.1f}x)")
    write_results(dict(benchmark="sobol_generator", torch=torch.__version__, threads=1,
                       generation=generation, estimates=estimates, default_call=default),
                  args.out)


if __name__ == "__main__":
    main()
