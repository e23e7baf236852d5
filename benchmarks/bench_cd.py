#!/usr/bin/env python3
"""Contextual decomposition: 64 masks on a CNN against the `acd` package, and ACD on 28x28.

- ``captum_interactions``: ``ContextualDecomposition.decompose`` with a batch of
  64 masks (one forward pass over 64 decompositions);
- ``acd`` 0.0.2 (``acd.cd(im, model, mask, device)``), called once per mask as its
  API requires; loaded without its scikit-image-dependent agglomeration module
  and with ``np.int`` shimmed; skipped if it does not import. The max absolute
  difference of the relevant scores is reported;
- the same call carrying both parts of every mask (``_shared_total = False``,
  the path before the shared total; equal to round-off), for the speed-up of
  carrying the total once per example;
- a plain forward of the model on the 2 x 64 rows of the two streams (the
  reference the target is stated against), and on the 64 + 1 rows the
  shared-total pass runs (relevant rows of 64 masks, then the example's
  total); CD's time as a multiple of each, and per mask;
- ``AgglomerativeContextualDecomposition.attribute`` on one 28x28 image
  (2x2 blocks -> 196 units, and 1x1 -> 784 units), time per call, shared
  total and two streams.

The CD variants and plain forwards are timed in interleaved rounds (median per
variant), so a change of load hits all of them alike. Records the threads and
the load average. Prints a table and writes ``benchmarks/results/cd.json``
(``cd_<device>.json`` for a non-CPU device); ``--readme FILE`` prints the
README paragraph computed from a results file.

    python benchmarks/bench_cd.py [--device cuda] [--quick] [--readme results/cd.json]
"""
import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from captum_interactions import AgglomerativeContextualDecomposition, ContextualDecomposition
from _common import device_name, load_acd_cd, sync, timed, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def cnn(device, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    ).to(device).eval()


def block_masks(num_masks, device, seed=0):
    """Random rectangles of 4..14 pixels per side on 28x28."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num_masks, 1, 1, 28, 28)
    for k in range(num_masks):
        h, w = torch.randint(4, 15, (2,), generator=gen).tolist()
        r, c = torch.randint(0, 28 - h, (1,), generator=gen).item(), torch.randint(
            0, 28 - w, (1,), generator=gen).item()
        masks[k, ..., r : r + h, c : c + w] = 1
    return masks.to(device)


def interleaved(fns, device, rounds):
    """Median seconds of each function, timed in ``rounds`` interleaved rounds."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def readme_paragraph(path):
    """The README paragraph on this benchmark, from its results file."""
    with open(path) as fh:
        result = json.load(fh)
    rows = {(r["task"], r["method"]): r for r in result["rows"]}
    ours = rows[("CD, 64 masks", "captum_interactions (batched)")]
    two = rows[("CD, 64 masks", "captum_interactions (two streams)")]
    plain = rows[("CD, 64 masks", "plain forward, 128 rows")]
    plain65 = rows[("CD, 64 masks", "plain forward, 65 rows")]
    acd = rows.get(("CD, 64 masks", "acd 0.0.2 (loop)"))
    a2 = rows[("ACD 28x28, 2x2 blocks", "captum_interactions")]
    a1 = rows[("ACD 28x28, 1x1 blocks", "captum_interactions")]
    a2t = rows[("ACD 28x28, 2x2 blocks", "captum_interactions (two streams)")]
    a1t = rows[("ACD 28x28, 1x1 blocks", "captum_interactions (two streams)")]
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    load = result.get("load_average")
    where = f"load average {load[0]:.1f} on {result.get('cpus')} cores" if load else "CPU"
    text = (
        f"**Contextual decomposition** (`bench_cd.py`, {result['threads']} thread"
        f"{'s' if result['threads'] != 1 else ''}, {where}, `results/cd.json`): 64 masks on an "
        f"MNIST-sized CNN in one batched pass, {ms(ours['seconds'])} "
        f"({ours['seconds_per_mask'] * 1e6:.0f} µs per mask), "
        f"{ours['vs_plain_forward']:.2f}× a plain forward of the two streams (128 rows, "
        f"{ms(plain['seconds'])}) and {ours['vs_plain_forward_65_rows']:.2f}× one of the 65 rows "
        f"it runs ({ms(plain65['seconds'])}): the true activation is computed once per example "
        f"and only the relevant part is carried per mask. Carrying both parts of every mask "
        f"(the previous path, same results to round-off) takes {ms(two['seconds'])} in the same "
        f"run ({two['seconds'] / ours['seconds']:.1f}×)."
    )
    if acd is not None:
        text += (
            f" `acd` 0.0.2 called per mask takes {ms(acd['seconds'])}, against "
            f"{ms(acd['ours_seconds_same_load'])} for this path timed right after it: "
            f"{acd['speedup_ours']:.1f}×; relevant scores equal to "
            f"{acd['max_abs_diff_vs_ours']:.1e}."
        )
    text += (
        f" ACD on a 28 × 28 image: {a2['seconds']:.3f} s with 2 × 2 blocks "
        f"({a2['units']} units), "
        f"{a1['seconds']:.2f} s with single pixels ({a1['units']} units); with both parts "
        f"carried {a2t['seconds']:.3f} s and {a1t['seconds']:.2f} s."
    )
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 1x1 ACD")
    parser.add_argument("--out", default=None)
    parser.add_argument("--readme", default=None, metavar="RESULTS",
                        help="print the README paragraph from a results file and exit")
    args = parser.parse_args()
    if args.readme:
        print(readme_paragraph(args.readme))
        return
    device = args.device
    repeats = 3 if args.quick else 5
    rounds = 5 if args.quick else 15
    load_before = os.getloadavg()
    model = cnn(device)
    torch.manual_seed(1)
    x = torch.randn(1, 1, 28, 28, device=device)
    masks = block_masks(64, device)
    cd = ContextualDecomposition(model)
    two_streams = ContextualDecomposition(model)
    two_streams._shared_total = False
    # the reference: a plain forward of the two streams (relevant and
    # irrelevant parts of 64 masks = 128 rows); and of the 64 + 1 rows the
    # shared-total pass runs
    streams = x.expand(2 * 64, *x.shape[1:]).contiguous()
    rows65 = x.expand(64 + 1, *x.shape[1:]).contiguous()

    def plain(batch):
        with torch.no_grad():
            return model(batch)

    fns = {
        "ours": lambda: cd.decompose(x, masks),
        "two": lambda: two_streams.decompose(x, masks),
        "plain": lambda: plain(streams),
        "plain65": lambda: plain(rows65),
    }
    for fn in fns.values():
        fn()  # warm-up
    t = interleaved(fns, device, rounds)
    rel, irr = cd.decompose(x, masks)
    rel_two, _ = two_streams.decompose(x, masks)
    with torch.no_grad():
        completeness = (rel + irr - model(x)).abs().max().item()
    rows = [dict(task="CD, 64 masks", method="captum_interactions (batched)", seconds=t["ours"],
                 seconds_per_mask=t["ours"] / 64, completeness_max_abs=completeness,
                 vs_plain_forward=t["ours"] / t["plain"],
                 vs_plain_forward_65_rows=t["ours"] / t["plain65"]),
            dict(task="CD, 64 masks", method="captum_interactions (two streams)",
                 seconds=t["two"], seconds_per_mask=t["two"] / 64,
                 vs_plain_forward=t["two"] / t["plain"],
                 max_abs_diff_vs_ours=(rel_two - rel).abs().max().item()),
            dict(task="CD, 64 masks", method="plain forward, 128 rows", seconds=t["plain"]),
            dict(task="CD, 64 masks", method="plain forward, 65 rows", seconds=t["plain65"])]
    acd_cd = load_acd_cd()
    if acd_cd is not None:
        def run_acd():
            out = [acd_cd(x, model, mask=masks[k, 0], device=device)[0] for k in range(64)]
            return torch.cat(out)

        run_acd()  # warm-up, as for ours
        t_acd, rel_acd = timed(run_acd, device, repeats)
        t_ours = timed(lambda: cd.decompose(x, masks), device, rounds)[0]  # same load as acd
        rows.append(dict(task="CD, 64 masks", method="acd 0.0.2 (loop)", seconds=t_acd,
                         seconds_per_mask=t_acd / 64,
                         max_abs_diff_vs_ours=(rel_acd.detach() - rel[:, 0]).abs().max().item(),
                         ours_seconds_same_load=t_ours, speedup_ours=t_acd / t_ours))
    for block in ((2,) if args.quick else (2, 1)):
        for label, shared in (("captum_interactions", True),
                              ("captum_interactions (two streams)", False)):
            acd = AgglomerativeContextualDecomposition(model)
            acd.cd._shared_total = shared
            acd.attribute(x, target=0, block_size=block)  # warm-up
            t_h, hierarchy = timed(lambda: acd.attribute(x, target=0, block_size=block), device,
                                   repeats)
            rows.append(dict(task=f"ACD 28x28, {block}x{block} blocks", method=label,
                             seconds=t_h, units=hierarchy.num_units,
                             levels=len(hierarchy.levels)))
    print(f"device: {device}  torch {torch.__version__}  ({device_name(device)})  "
          f"threads {torch.get_num_threads()}  load {os.getloadavg()[0]:.1f}")
    print(f"{'task':<26} {'method':<34} {'seconds':>10}  notes")
    for row in rows:
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k not in ("task", "method", "seconds"))
        print(f"{row['task']:<26} {row['method']:<34} {row['seconds']:>10.4f}  {notes}")
    name = "cd.json" if device == "cpu" else f"cd_{device.split(':')[0]}.json"
    out = args.out or os.path.join(HERE, "results", name)
    load_after = os.getloadavg()
    write_results(dict(device=device, torch=torch.__version__, threads=torch.get_num_threads(),
                       omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cpus=os.cpu_count(),
                       load_average=[load_before[0], load_after[0]],
                       quick=args.quick, rows=rows), out)
    if not args.quick and device == "cpu":
        print()
        print(readme_paragraph(out))


if __name__ == "__main__":
    main()
