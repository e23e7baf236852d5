import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from captum_interactions import ExpectedHessians
from captum_interactions._core.dataset import explain_dataset
from captum_interactions._utils.distributed import distributed_context, rank_chunks
from tests.test_dataset import (
    REPO_ROOT,
    N_EXAMPLES,
    _interrupt_after,
    loader_of,
    make_problem,
    with_labels,
)

# Expected Hessians is random: equality across world sizes shows the per-chunk seeding.
SETTINGS = dict(batch_to_inputs=with_labels, chunk_size=3, seed=3, top_k=5,
                dependence_pairs=[(0, 2)], progress=False)

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from captum_interactions import ExpectedHessians
    from captum_interactions._core.dataset import explain_dataset
    from tests.test_distributed import SETTINGS
    from tests.test_dataset import make_problem, loader_of

    # the suite's device (CAPTUM_INTERACTIONS_TEST_DEVICE) in every rank; NCCL
    # needs one GPU per rank, so ranks sharing one GPU use gloo (CUDA tensors too)
    device = os.environ.get("CAPTUM_INTERACTIONS_TEST_DEVICE", "cpu")
    backend = "gloo"
    if device != "cpu":
        if torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"]):
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            backend = "nccl"
        torch.set_default_device(device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x, labels, background = make_problem()
    kwargs = {"baselines": background, "n_samples": 8}
    for out_dir in sys.argv[1:]:
        if out_dir.endswith("refuse"):
            # other data than the stored chunks were computed from: every rank refuses
            changed = x.clone()
            changed[7, 1] += 1.0
            try:
                explain_dataset(ExpectedHessians(model), loader_of(changed, labels), out_dir,
                                kwargs, **SETTINGS)
            except ValueError as err:
                with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as fh:
                    fh.write(str(err))
            continue
        result = explain_dataset(ExpectedHessians(model), loader_of(x, labels), out_dir,
                                 kwargs, **SETTINGS)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(dict(world=world, n=len(result), top=result.top_pairs,
                           mean=result.mean_interactions.sum().item()), fh)
    dist.destroy_process_group()
    """
)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_chunks_partition_without_duplicates():
    for num_chunks in (0, 1, 5, 8):
        for world in (1, 2, 3):
            shards = [rank_chunks(num_chunks, r, world) for r in range(world)]
            assert sorted(c for s in shards for c in s) == list(range(num_chunks))
    assert distributed_context() == (0, 1)


def test_two_process_torchrun_equals_single_process(tmp_path):
    model, x, labels, background = make_problem()
    kwargs = {"baselines": background, "n_samples": 8}
    single = explain_dataset(
        ExpectedHessians(model), loader_of(x, labels), tmp_path / "single", kwargs, **SETTINGS
    )
    # a single-process run that crashed after 2 chunks, to be finished by 2 processes
    crashing = ExpectedHessians(model)
    _interrupt_after(crashing, 2)
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(crashing, loader_of(x, labels), tmp_path / "resumed", kwargs, **SETTINGS)

    # a damaged chunk of the crashed run, owned by rank 1: recomputed there
    damaged = tmp_path / "resumed" / "chunks" / "chunk_000001.safetensors"
    with open(damaged, "r+b") as fh:
        fh.truncate(os.path.getsize(damaged) // 2)
    # a finished run to be resumed with other data
    explain_dataset(ExpectedHessians(model), loader_of(x, labels), tmp_path / "refuse", kwargs,
                    **SETTINGS)

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script),
        str(tmp_path / "dist"), str(tmp_path / "resumed"), str(tmp_path / "refuse"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for name in ("dist", "resumed"):
        out = tmp_path / name
        from captum_interactions._core.dataset import DatasetExplanation

        result = DatasetExplanation.load(str(out))
        indices = torch.cat([idx for idx, _ in result.iter_chunks()])
        assert torch.equal(indices, torch.arange(N_EXAMPLES))
        torch.testing.assert_close(
            result.interactions(), single.interactions(), rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(result.mean_interactions, single.mean_interactions)
        torch.testing.assert_close(result.mean_abs_interactions, single.mean_abs_interactions)
        # bit-identical: per-chunk seeds, and summaries summed in chunk order
        assert torch.equal(result.interactions(), single.interactions())
        assert torch.equal(result.mean_interactions, single.mean_interactions)
        assert torch.equal(result.mean_abs_interactions, single.mean_abs_interactions)
        assert [p[:2] for p in result.top_pairs] == [p[:2] for p in single.top_pairs]
        torch.testing.assert_close(
            result.dependence[(0, 2)]["interaction"], single.dependence[(0, 2)]["interaction"]
        )
        # both ranks returned the same, complete result
        reports = [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]
        assert all(r["world"] == 2 and r["n"] == N_EXAMPLES for r in reports)
        assert reports[0]["top"] == reports[1]["top"]
        assert reports[0]["mean"] == pytest.approx(single.mean_interactions.sum().item())

    assert str(damaged) in proc.stderr  # rank 1's warning named the damaged file
    assert os.path.exists(str(damaged) + ".damaged")
    errors = [open(tmp_path / "refuse" / f"rank{r}.error").read() for r in (0, 1)]
    assert "inputs of chunk 2 (examples 6–8) differ" in errors[0]
    assert "another rank refused" in errors[1]
