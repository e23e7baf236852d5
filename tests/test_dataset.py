import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_interactions import ExpectedHessians, IntegratedHessians
from captum_interactions._core.dataset import (
    DatasetExplanation,
    _chunk_seed,
    explain_dataset,
)

DTYPE = torch.float64
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EXAMPLES, D_IN, D_OUT = 23, 4, 3


def make_problem(seed=0):
    """A float64 softplus MLP with 3 outputs, 23 examples with labels."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(D_IN, 12), nn.Softplus(beta=2.0), nn.Linear(12, D_OUT)
    ).to(DTYPE)
    x = torch.randn(N_EXAMPLES, D_IN, dtype=DTYPE)
    labels = torch.randint(D_OUT, (N_EXAMPLES,))
    background = torch.randn(10, D_IN, dtype=DTYPE)
    return model, x, labels, background


def loader_of(x, labels, batch_size=5):
    return DataLoader(TensorDataset(x, labels), batch_size=batch_size)


def with_labels(batch):
    return {"inputs": batch[0], "target": batch[1]}


def test_single_process_equals_method_on_whole_dataset(tmp_path):
    model, x, labels, _ = make_problem()
    ih = IntegratedHessians(model)
    # chunk_size not a multiple of batch_size: chunks end with a short batch
    result = explain_dataset(
        ih, loader_of(x, labels), tmp_path, attribute_kwargs={"n_steps": 8},
        batch_to_inputs=with_labels, chunk_size=7, top_k=4,
        dependence_pairs=[(0, 1), (3, 2)], progress=False,
    )
    expected = ih.attribute(x, target=labels, n_steps=8)
    assert len(result) == N_EXAMPLES and result.num_chunks == 4
    torch.testing.assert_close(result.interactions(), expected, rtol=1e-12, atol=1e-14)
    for k in (0, 6, 7, 22, -1):
        torch.testing.assert_close(result[k], expected[k], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.mean_interactions, expected.mean(0))
    abs_mean = expected.abs().mean(0)
    torch.testing.assert_close(result.mean_abs_interactions, abs_mean)
    iu, ju = torch.triu_indices(D_IN, D_IN, offset=1)
    best = abs_mean[iu, ju].argsort(descending=True)[:4]
    assert [(i, j) for i, j, _ in result.top_pairs] == [
        (int(iu[b]), int(ju[b])) for b in best
    ]
    for (i, j), dep in result.dependence.items():
        torch.testing.assert_close(dep["x_i"], x[:, i])
        torch.testing.assert_close(dep["x_j"], x[:, j])
        torch.testing.assert_close(dep["interaction"], expected[:, i, j], rtol=1e-12, atol=1e-14)
    # reopen from disk, chunks in dataset order
    reopened = DatasetExplanation.load(str(tmp_path))
    indices = torch.cat([idx for idx, _ in reopened.iter_chunks()])
    assert torch.equal(indices, torch.arange(N_EXAMPLES))
    assert json.load(open(tmp_path / "manifest.json"))["complete"] is True


def test_grouped_and_tuple_inputs(tmp_path):
    model, x, labels, _ = make_problem()
    ih = IntegratedHessians(model)
    mask = torch.tensor([[0, 0, 1, 2]])
    grouped = explain_dataset(
        ih, loader_of(x, labels), tmp_path / "g",
        attribute_kwargs={"n_steps": 4, "target": 1, "feature_mask": mask}, progress=False,
    )
    expected = ih.attribute(x, target=1, n_steps=4, feature_mask=mask)
    assert grouped.example_shape == (3, 3)
    torch.testing.assert_close(grouped.interactions(), expected)
    with pytest.raises(ValueError, match="dependence_pairs"):
        explain_dataset(
            ih, loader_of(x, labels), tmp_path / "g2",
            attribute_kwargs={"n_steps": 4, "target": 1, "feature_mask": mask},
            dependence_pairs=[(0, 1)], progress=False,
        )

    def two_inputs(batch):
        return (batch[0][:, :1], batch[0][:, 1:])

    def model_two(a, b):
        return model(torch.cat([a, b], dim=1))

    ih2 = IntegratedHessians(model_two)
    stacked = explain_dataset(
        ih2, loader_of(x, labels), tmp_path / "t", attribute_kwargs={"n_steps": 4, "target": 2},
        batch_to_inputs=two_inputs, dependence_pairs=[(0, 3)], progress=False,
    )
    full = ih.attribute(x, target=2, n_steps=4)
    torch.testing.assert_close(stacked.interactions(), full)
    torch.testing.assert_close(stacked.dependence[(0, 3)]["x_j"], x[:, 3])


class _Interrupt(Exception):
    pass


def _interrupt_after(method, num_batches, exc=KeyboardInterrupt):
    """Make ``method.attribute`` raise after ``num_batches`` successful calls."""
    inner = method.attribute
    calls = [0]

    def attribute(*args, **kwargs):
        if calls[0] == num_batches:
            raise exc("simulated crash")
        calls[0] += 1
        return inner(*args, **kwargs)

    method.attribute = attribute  # instance attribute: the class name is unchanged


def test_random_method_crash_and_resume_loses_and_duplicates_nothing(tmp_path):
    model, x, labels, background = make_problem()
    kwargs = {"baselines": background, "n_samples": 16}
    run = dict(batch_to_inputs=with_labels, chunk_size=5, seed=7, progress=False)
    whole = explain_dataset(
        ExpectedHessians(model), loader_of(x, labels), tmp_path / "a", kwargs, **run
    )
    # per-chunk seeds: chunk c equals the method on that chunk under its own seed
    with torch.random.fork_rng():
        torch.manual_seed(_chunk_seed(7, 2))
        chunk2 = ExpectedHessians(model).attribute(x[10:15], target=labels[10:15], **kwargs)
    torch.testing.assert_close(whole.interactions()[10:15], chunk2, rtol=1e-12, atol=1e-14)

    crashing = ExpectedHessians(model)
    _interrupt_after(crashing, 3)  # chunks 0-2 done, 3 in flight
    state = torch.get_rng_state()
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(crashing, loader_of(x, labels), tmp_path / "b", kwargs, **run)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    files = sorted(os.listdir(tmp_path / "b" / "chunks"))
    assert files == [f"chunk_{c:06d}.safetensors" for c in range(3)]  # no partial file
    manifest = json.load(open(tmp_path / "b" / "manifest.json"))
    assert manifest["complete"] is False and manifest["num_chunks"] == 5

    # a wrong setting is refused, the right one resumes
    with pytest.raises(ValueError, match="n_samples"):
        explain_dataset(
            ExpectedHessians(model), loader_of(x, labels), tmp_path / "b",
            {"baselines": background, "n_samples": 17}, **run,
        )
    with pytest.raises(ValueError, match="chunk_size"):
        explain_dataset(
            ExpectedHessians(model), loader_of(x, labels), tmp_path / "b", kwargs,
            **dict(run, chunk_size=6),
        )
    counting = ExpectedHessians(model)
    _interrupt_after(counting, 10**9)
    resumed = explain_dataset(counting, loader_of(x, labels), tmp_path / "b", kwargs, **run)
    assert sum(1 for _ in resumed.iter_chunks()) == 5
    indices = torch.cat([idx for idx, _ in resumed.iter_chunks()])
    assert torch.equal(indices, torch.arange(N_EXAMPLES))
    torch.testing.assert_close(resumed.interactions(), whole.interactions(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.mean_abs_interactions, whole.mean_abs_interactions)
    assert [pair[:2] for pair in resumed.top_pairs] == [pair[:2] for pair in whole.top_pairs]
    assert [pair[2] for pair in resumed.top_pairs] == pytest.approx(
        [pair[2] for pair in whole.top_pairs]
    )

    # resume=False starts over
    fresh = explain_dataset(
        ExpectedHessians(model), loader_of(x, labels), tmp_path / "b",
        {"baselines": background, "n_samples": 17}, resume=False, **run,
    )
    assert not torch.equal(fresh.interactions(), whole.interactions())


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from captum_interactions import IntegratedHessians
    from captum_interactions._core.dataset import explain_dataset
    from tests.test_dataset import make_problem, loader_of, with_labels

    model, x, labels, _ = make_problem()
    ih = IntegratedHessians(model)
    inner = ih.attribute

    def slow(*args, **kwargs):
        time.sleep(0.15)
        return inner(*args, **kwargs)

    ih.attribute = slow
    explain_dataset(ih, loader_of(x, labels, batch_size=2), sys.argv[1],
                    {"n_steps": 4}, batch_to_inputs=with_labels, chunk_size=2,
                    progress=False)
    """
)


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    model, x, labels, _ = make_problem()
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    out_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(out_dir)], env=env)
    try:
        deadline = time.time() + 60
        chunk_dir = out_dir / "chunks"
        while time.time() < deadline and proc.poll() is None:
            done = [f for f in os.listdir(chunk_dir) if f.endswith(".safetensors")] if chunk_dir.exists() else []
            if len(done) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    num_done = len([f for f in os.listdir(out_dir / "chunks") if f.endswith(".safetensors")])
    assert 3 <= num_done < 12
    ih = IntegratedHessians(model)
    resumed = explain_dataset(
        ih, loader_of(x, labels, batch_size=2), out_dir, {"n_steps": 4},
        batch_to_inputs=with_labels, chunk_size=2, progress=False,
    )
    assert not [f for f in os.listdir(out_dir / "chunks") if ".tmp." in f]
    indices = torch.cat([idx for idx, _ in resumed.iter_chunks()])
    assert torch.equal(indices, torch.arange(N_EXAMPLES))
    expected = ih.attribute(x, target=labels, n_steps=4)
    torch.testing.assert_close(resumed.interactions(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(resumed.mean_interactions, expected.mean(0))


def test_bad_arguments_raise_clear_errors(tmp_path):
    model, x, labels, _ = make_problem()
    ih = IntegratedHessians(model)
    data = TensorDataset(x, labels)
    with pytest.raises(ValueError, match="shuffle=False"):
        explain_dataset(ih, DataLoader(data, batch_size=4, shuffle=True), tmp_path)
    with pytest.raises(TypeError, match="DataLoader"):
        explain_dataset(ih, [x], tmp_path)
    with pytest.raises(TypeError, match="attribute"):
        explain_dataset(model, loader_of(x, labels), tmp_path)
    with pytest.raises(TypeError, match="method_function"):
        explain_dataset(ih, loader_of(x, labels), tmp_path, method_function="interactions")
    with pytest.raises(ValueError, match="chunk_size"):
        explain_dataset(ih, loader_of(x, labels), tmp_path, chunk_size=0)
    with pytest.raises(ValueError, match="return_convergence_delta"):
        explain_dataset(
            ih, loader_of(x, labels), tmp_path,
            {"target": 0, "return_convergence_delta": True},
        )
    with pytest.raises(ValueError, match="both set"):
        explain_dataset(
            ih, loader_of(x, labels), tmp_path / "c", {"target": 0},
            batch_to_inputs=with_labels, progress=False,
        )

    class FirstOrder:
        def attribute(self, inputs):
            return inputs * 2  # (N, D): not an interaction matrix

    with pytest.raises(ValueError, match="interaction matrix|needs"):
        explain_dataset(FirstOrder(), loader_of(x, labels), tmp_path / "d", progress=False)


def test_every_matrix_method_runs_over_a_dataset(tmp_path):
    """HOPE (order 2), SmoothHess and CD interactions (``method_function``) over a
    loader equal the method on the whole dataset."""
    from captum_interactions import HOPE, ContextualDecomposition, SmoothHess

    model, x, labels, _ = make_problem()
    loader = loader_of(x, labels)
    hope = explain_dataset(HOPE(model), loader, tmp_path / "hope",
                           {"order": 2, "target": 1}, progress=False)
    torch.testing.assert_close(hope.interactions(),
                               HOPE(model).attribute(x, order=2, target=1))
    mask = torch.tensor([[0, 0, 1, 2]])
    cd = ContextualDecomposition(model)
    with pytest.raises(ValueError, match="ContextualDecomposition.attribute returned shape"):
        explain_dataset(cd, loader, tmp_path / "cd_scores",
                        {"feature_mask": mask, "target": 0}, progress=False)
    cd_run = explain_dataset(cd, loader, tmp_path / "cd", {"feature_mask": mask, "target": 0},
                             method_function="interactions", progress=False)
    torch.testing.assert_close(cd_run.interactions(),
                               cd.interactions(x, feature_mask=mask, target=0))
    smooth = explain_dataset(SmoothHess(model), loader, tmp_path / "smooth",
                             {"target": 0, "n_samples": 16, "stdevs": 0.1}, progress=False)
    assert smooth.interactions().shape == (x.shape[0], x.shape[1], x.shape[1])
    assert smooth.interactions().isfinite().all()
