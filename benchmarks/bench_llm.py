#!/usr/bin/env python3
"""LLMInteractionAttribution: token x token interactions of prompts of 16, 64 and
256 tokens on a GPT-2-small-shaped causal LM (random weights, nothing downloaded).

Model: GPT-2 with 12 layers x 768 dims (MLP 3072), 12 heads, a 50257-word vocabulary
(124M parameters, GPT-2 small's shape)
(``--quick``: 2 layers x 128 dims, 4 heads, 4096 words), float32, eager
attention, random weights; a word-level tokenizer over the same number of
words. Explained output: log p(target | prompt) of a 2-token target; layer:
the input embeddings; baseline: token id 0 everywhere in the prompt;
``n_steps`` points of the Gauss rule for the -ln(t) weight.

For each prompt length T, compared in the same run:

- ``grouped (ours)``: T HVPs per path point (one per token), in batches of
  at most ``--internal-batch-size`` HVPs. Run in full where T <= ``--full-max``
  (time, peak memory, HVPs counted by the class); for longer prompts the time
  is extrapolated from a measured unit: one gradient pass with graph at a
  path point plus one batch of C = internal-batch-size HVPs
  (n_steps x (t_grad + T/C x t_hvp(C))). The unit's peak memory is the
  chunked call's peak (chunking bounds what is alive at once).
- ``per-coordinate``: the Hessian over every embedding coordinate (T x E HVPs
  per path point), always extrapolated from the same unit
  (n_steps x (t_grad + T E / C x t_hvp(C))).
- ``unchunked peak``: the unit's peak memory with all T directions in one
  batch (what ``internal_batch_size=None`` needs), where it fits.

Wall-clock times; for whole calls the process CPU time too (on a shared
machine the wall-clock time includes waiting for a core). Memory is the growth of resident memory over the loaded model on the CPU
(sampled), ``torch.cuda.max_memory_allocated`` growth on CUDA. Prints a table
and writes ``benchmarks/results/llm_<device>[_quick].json``.

    python benchmarks/bench_llm.py [--quick] [--device cuda] [--lengths 16 64 256]
"""
import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from captum.attr import TextTokenInput  # noqa: E402

from captum_interactions import LLMInteractionAttribution  # noqa: E402
from captum_interactions._utils.hessian import hessian_vector_products  # noqa: E402
from captum_interactions._utils.tiny_lm import tiny_gpt2, word_level_tokenizer  # noqa: E402
from _common import PeakRSS, device_name, sync, write_results  # noqa: E402


class PeakMemory:
    """Peak growth of memory in a block: CUDA allocator on a GPU, sampled RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.growth_bytes = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.growth_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._rss.__exit__(*exc)
            self.growth_bytes = self._rss.growth_bytes


def unit_cost(model, ids, target_ids, prompt_length, directions, device):
    """(seconds of one gradient pass with graph, seconds of one batch of HVPs, peak bytes).

    The same computation as one row of the class's path loop: the embeddings
    of the prompt + target as a leaf, log p(target) summed, its gradient with
    a graph, then ``directions`` Hessian-vector products in one batched backward.
    """
    embeddings = model.get_input_embeddings()(ids).detach()
    count = target_ids.shape[0]
    with PeakMemory(device) as peak:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        leaf = embeddings.clone().requires_grad_(True)
        # as the class does: only the K + 1 last positions go through the vocabulary head
        logits = model(inputs_embeds=leaf, logits_to_keep=count + 1).logits[:, :count]
        log_prob = logits.log_softmax(-1).gather(-1, target_ids.view(1, -1, 1)).sum()
        (grad,) = torch.autograd.grad(log_prob, leaf, create_graph=True)
        sync(device)
        t_grad, cpu_grad = time.perf_counter() - start, time.process_time() - cpu_start
        vectors = torch.randn((directions,) + tuple(leaf.shape), device=device, dtype=leaf.dtype)
        start, cpu_start = time.perf_counter(), time.process_time()
        hessian_vector_products((leaf,), (grad,), (vectors,))
        sync(device)
        t_hvp, cpu_hvp = time.perf_counter() - start, time.process_time() - cpu_start
        del grad, logits, log_prob, leaf
    return t_grad, t_hvp, peak.growth_bytes, cpu_grad, cpu_hvp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--n-steps", type=int, default=None)
    parser.add_argument("--internal-batch-size", type=int, default=8)
    parser.add_argument("--full-max", type=int, default=None,
                        help="run the whole call for prompts up to this length")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="unit measurements (best is kept)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        shape = dict(n_layer=2, n_embd=128, n_head=4, vocab=4096)
        n_steps = args.n_steps or 8
        full_max = args.full_max if args.full_max is not None else 256
    else:
        shape = dict(n_layer=12, n_embd=768, n_head=12, vocab=50257)
        n_steps = args.n_steps or 16
        full_max = args.full_max if args.full_max is not None else 16
    chunk = args.internal_batch_size
    words = ["<unk>", "<pad>", "<bos>"] + [f"w{i}" for i in range(3, shape["vocab"])]
    tokenizer = word_level_tokenizer(words, add_bos=False)
    model = tiny_gpt2(shape["vocab"], tokenizer, n_layer=shape["n_layer"], n_embd=shape["n_embd"],
                      n_head=shape["n_head"], n_inner=4 * shape["n_embd"],
                      n_positions=max(args.lengths) + 8).to(device)
    params = sum(p.numel() for p in model.parameters())
    llm = LLMInteractionAttribution(model, tokenizer)
    generator = torch.Generator().manual_seed(0)
    embed = shape["n_embd"]
    rows = []
    print(f"GPT-2 shape {shape}, {params / 1e6:.1f}M parameters, n_steps={n_steps}, "
          f"internal_batch_size={chunk}, device={device} ({device_name(device)}), "
          f"torch threads={torch.get_num_threads()}")
    for length in args.lengths:
        prompt = torch.randint(3, shape["vocab"], (length,), generator=generator).tolist()
        target = torch.randint(3, shape["vocab"], (2,), generator=generator).to(device)
        text = " ".join(words[i] for i in prompt)
        ids = torch.tensor([prompt + target.tolist()], device=device)
        unit_cost(model, ids, target, length, chunk, device)  # warm-up
        units = [unit_cost(model, ids, target, length, chunk, device) for _ in range(args.repeats)]
        t_grad = min(u[0] for u in units)
        t_hvp = min(u[1] for u in units)
        unit_peak = max(u[2] for u in units)
        cpu_grad = min(u[3] for u in units)
        cpu_hvp = min(u[4] for u in units)
        grouped_hvps = n_steps * length
        coordinate_hvps = n_steps * length * embed
        per_hvp = t_hvp / chunk
        grouped_estimate = n_steps * (t_grad + length * per_hvp)
        coordinate_estimate = n_steps * (t_grad + length * embed * per_hvp)
        # the same from CPU time (one thread: the work done, not the waits of a shared machine)
        grouped_cpu_estimate = n_steps * (cpu_grad + length * cpu_hvp / chunk)
        coordinate_cpu_estimate = n_steps * (cpu_grad + length * embed * cpu_hvp / chunk)
        row = dict(prompt_tokens=length, target_tokens=2, n_steps=n_steps,
                   internal_batch_size=chunk, unit_gradient_s=t_grad, unit_hvp_batch_s=t_hvp,
                   grouped_hvps=grouped_hvps, grouped_estimate_s=grouped_estimate,
                   per_coordinate_hvps=coordinate_hvps,
                   per_coordinate_estimate_s=coordinate_estimate,
                   unit_gradient_cpu_s=cpu_grad, unit_hvp_batch_cpu_s=cpu_hvp,
                   grouped_estimate_cpu_s=grouped_cpu_estimate,
                   per_coordinate_estimate_cpu_s=coordinate_cpu_estimate,
                   chunked_unit_peak_bytes=unit_peak)
        if length <= full_max:
            inp = TextTokenInput(text, tokenizer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # random weights: completeness is reported below
                with PeakMemory(device) as peak:
                    sync(device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    result = llm.attribute(inp, target=target, n_steps=n_steps,
                                           internal_batch_size=chunk)
                    sync(device)
                    elapsed = time.perf_counter() - start
                    cpu_elapsed = time.process_time() - cpu_start
            change = float((result.output_log_probs - result.baseline_log_probs).sum())
            row.update(grouped_measured_s=elapsed, grouped_measured_cpu_s=cpu_elapsed,
                       grouped_measured_peak_bytes=peak.growth_bytes,
                       grouped_measured_hvps=result.hvps,
                       completeness_relative_error=abs(result.seq_delta) / max(abs(change), 1e-12))
            assert result.hvps == grouped_hvps
        if length <= 64 or args.quick:
            unchunked_peak = unit_cost(model, ids, target, length, length, device)[2]
            row["unchunked_unit_peak_bytes"] = unchunked_peak
        rows.append(row)
        measured = row.get("grouped_measured_s")
        print(
            f"T={length:4d}  grouped: {grouped_hvps:6d} HVPs, "
            + (f"{measured:8.2f} s measured ({row['grouped_measured_cpu_s']:.2f} s CPU), "
               if measured is not None else "")
            + f"{grouped_estimate:8.2f} s ({grouped_cpu_estimate:.2f} s CPU) from unit, "
            f"peak {unit_peak / 2**20:7.1f} MiB"
            + (f" (whole call {row['grouped_measured_peak_bytes'] / 2**20:7.1f} MiB)"
               if measured is not None else "")
            + (f" (unchunked {row['unchunked_unit_peak_bytes'] / 2**20:7.1f} MiB)"
               if "unchunked_unit_peak_bytes" in row else "")
            + f" | per-coordinate: {coordinate_hvps:9d} HVPs, {coordinate_estimate:10.1f} s "
            f"({coordinate_cpu_estimate:.1f} s CPU, x{coordinate_cpu_estimate / grouped_cpu_estimate:.0f})",
            flush=True,
        )
    name = f"llm_{device.type}{'_quick' if args.quick else ''}.json"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    write_results(dict(
        benchmark="bench_llm", model="GPT-2 (random weights)", shape=shape, parameters=params,
        dtype="float32", attention="eager", device=str(device), device_name=device_name(device),
        torch_threads=torch.get_num_threads(), torch=torch.__version__, rows=rows,
        note="per-coordinate times are extrapolated from the measured unit; grouped times are "
             "measured where grouped_measured_s is present",
    ), out)


if __name__ == "__main__":
    main()
