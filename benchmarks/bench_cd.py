#!/usr/bin/env python3
"""Contextual decomposition: 64 masks on a CNN against the `acd` package, and ACD on 28x28.

- ``captum_interactions``: ``ContextualDecomposition.decompose`` with a batch of
  64 masks (one forward pass over 64 decompositions);
- ``acd`` 0.0.2 (``acd.cd(im, model, mask, device)``), called once per mask as its
  API requires; loaded without its scikit-image-dependent agglomeration module
  and with ``np.int`` shimmed; skipped if it does not import. The max absolute
  difference of the relevant scores is reported;
- a plain forward of the model on the 2 x 64 rows of the two streams (the
  floor for CD's pass), and CD's time as a multiple of it;
- ``AgglomerativeContextualDecomposition.attribute`` on one 28x28 image
  (2x2 blocks -> 196 units, and 1x1 -> 784 units), time per call.

Prints a table and writes ``benchmarks/results/cd.json`` (``cd_<device>.json``
for a non-CPU device).

    python benchmarks/bench_cd.py [--device cuda] [--quick]
"""
import argparse
import os

import torch
from torch import nn

from captum_interactions import AgglomerativeContextualDecomposition, ContextualDecomposition
from _common import device_name, load_acd_cd, timed, write_results  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no 1x1 ACD")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    repeats = 3 if args.quick else 5
    model = cnn(device)
    torch.manual_seed(1)
    x = torch.randn(1, 1, 28, 28, device=device)
    masks = block_masks(64, device)
    cd = ContextualDecomposition(model)
    cd.decompose(x, masks)  # warm-up
    t_ours, (rel, irr) = timed(lambda: cd.decompose(x, masks), device, repeats)
    with torch.no_grad():
        completeness = (rel + irr - model(x)).abs().max().item()
    # the floor: a plain forward of the two streams (relevant and irrelevant
    # parts of 64 masks = 128 rows), timed the same way
    streams = x.expand(2 * 64, *x.shape[1:]).contiguous()
    with torch.no_grad():
        model(streams)  # warm-up
        t_plain, _ = timed(lambda: model(streams), device, repeats)
    rows = [dict(task="CD, 64 masks", method="captum_interactions (batched)", seconds=t_ours,
                 completeness_max_abs=completeness, vs_plain_forward=t_ours / t_plain),
            dict(task="CD, 64 masks", method="plain forward, 128 rows", seconds=t_plain)]
    acd_cd = load_acd_cd()
    if acd_cd is not None:
        def run_acd():
            out = [acd_cd(x, model, mask=masks[k, 0], device=device)[0] for k in range(64)]
            return torch.cat(out)

        run_acd()  # warm-up, as for ours
        t_acd, rel_acd = timed(run_acd, device, repeats)
        rows.append(dict(task="CD, 64 masks", method="acd 0.0.2 (loop)", seconds=t_acd,
                         max_abs_diff_vs_ours=(rel_acd.detach() - rel[:, 0]).abs().max().item(),
                         speedup_ours=t_acd / t_ours))
    acd = AgglomerativeContextualDecomposition(model)
    for block in ((2,) if args.quick else (2, 1)):
        acd.attribute(x, target=0, block_size=block)  # warm-up
        t_h, hierarchy = timed(lambda: acd.attribute(x, target=0, block_size=block), device,
                               1 if block == 1 else repeats)
        rows.append(dict(task=f"ACD 28x28, {block}x{block} blocks", method="captum_interactions",
                         seconds=t_h, units=hierarchy.num_units, levels=len(hierarchy.levels)))
    print(f"device: {device}  torch {torch.__version__}  ({device_name(device)})")
    print(f"{'task':<26} {'method':<32} {'seconds':>10}  notes")
    for row in rows:
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items() if k not in ("task", "method", "seconds"))
        print(f"{row['task']:<26} {row['method']:<32} {row['seconds']:>10.4f}  {notes}")
    name = "cd.json" if device == "cpu" else f"cd_{device.split(':')[0]}.json"
    out = args.out or os.path.join(HERE, "results", name)
    write_results(dict(device=device, torch=torch.__version__, threads=torch.get_num_threads(),
                       quick=args.quick, rows=rows), out)


if __name__ == "__main__":
    main()
