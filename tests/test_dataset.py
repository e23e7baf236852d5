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
            done = ([f for f in os.listdir(chunk_dir) if f.endswith(".safetensors")]
                    if chunk_dir.exists() else [])
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

    with pytest.raises(ValueError, match="interaction matrix|needs"), \
            pytest.warns(RuntimeWarning, match="found no parameters or buffers"):
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


def _method_calls():
    """(name, method, one call of it) for every public attribution class."""
    from captum_interactions import (
        HOPE, AgglomerativeContextualDecomposition, ContextualDecomposition,
        LayerIntegratedHessians, SmoothHess,
    )

    model, x, labels, background = make_problem()
    mask = torch.tensor([[0, 0, 1, 2]])
    ih, eh = IntegratedHessians(model), ExpectedHessians(model)
    smooth, hope = SmoothHess(model), HOPE(model)
    layer_ih = LayerIntegratedHessians(model, model[0])
    cd = ContextualDecomposition(model)
    acd = AgglomerativeContextualDecomposition(model)
    return [
        ("IntegratedHessians", ih, lambda: ih.attribute(x[:3], target=0, n_steps=4)),
        ("ExpectedHessians", eh,
         lambda: eh.attribute(x[:3], background, target=0, n_samples=4)),
        ("SmoothHess", smooth,
         lambda: smooth.attribute(x[:3], target=0, n_samples=16, stdevs=0.1)),
        ("HOPE", hope, lambda: hope.attribute(x[:3], order=3, target=0)),
        ("LayerIntegratedHessians", layer_ih,
         lambda: layer_ih.attribute(x[:3], target=0, n_steps=4)),
        ("ContextualDecomposition", cd,
         lambda: cd.interactions(x[:3], feature_mask=mask, target=0)),
        ("AgglomerativeContextualDecomposition", acd, lambda: acd.attribute(x[:1], target=0, structure="sequence")),
    ]


@pytest.mark.parametrize("index", range(7))
def test_a_call_leaves_the_method_fingerprint_as_it_was(index):
    """What a call stores on the method (per-call records, caches) is not a
    setting: a run resumed or run on other ranks after the method was used
    for a call must not be refused as "method settings differ"."""
    from captum_interactions._utils.dataset_storage import method_fingerprint

    name, method, call = _method_calls()[index]
    before = method_fingerprint(method, "attribute")
    call()
    call()
    assert method_fingerprint(method, "attribute") == before, name


def test_a_run_resumes_after_the_method_was_used_for_a_call(tmp_path):
    """SmoothHess keeps a cache of its subspace basis between calls: a run
    interrupted, then resumed with the same object after a call of its own,
    resumes (before, the cache made the fingerprint differ)."""
    from captum_interactions import SmoothHess

    model, x, labels, _ = make_problem()
    kwargs = {"n_samples": 16, "stdevs": 0.1}
    smooth = SmoothHess(model)
    _interrupt_after(smooth, 2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(smooth, loader_of(x, labels), out, kwargs, **FAULT_RUN)
    del smooth.attribute  # the class's own method again
    smooth.attribute(x[:2], target=0, **kwargs)
    count = _counting(smooth)
    resumed = explain_dataset(smooth, loader_of(x, labels), out, kwargs, **FAULT_RUN)
    assert count[0] == N_EXAMPLES - 10
    assert resumed.interactions().shape == (N_EXAMPLES, D_IN, D_IN)


# ---------------------------------------------------------------- integrity
# A 23-example run in chunks of 5 (chunks 0-3 full, chunk 4 of 3 examples);
# every fault is detected naming the file or setting, and a rerun repairs it
# recomputing only what is damaged.
FAULT_RUN = dict(batch_to_inputs=with_labels, chunk_size=5, progress=False)
FAULT_KWARGS = {"n_steps": 4}


def _counting(method):
    """Wrap ``method.attribute`` to count the examples it explains."""
    inner = method.attribute
    count = [0]

    def attribute(inputs, *args, **kwargs):
        count[0] += inputs.shape[0]
        return inner(inputs, *args, **kwargs)

    method.attribute = attribute
    return count


def _reference_run(out_dir, model=None, x=None):
    problem = make_problem()
    model = problem[0] if model is None else model
    x = problem[1] if x is None else x
    return explain_dataset(IntegratedHessians(model), loader_of(x, problem[2]), out_dir,
                           FAULT_KWARGS, **FAULT_RUN)


def _chunk_file(out_dir, c):
    return os.path.join(str(out_dir), "chunks", f"chunk_{c:06d}.safetensors")


def _rerun(out_dir):
    model, x, labels, _ = make_problem()
    ih = IntegratedHessians(model)
    count = _counting(ih)
    result = explain_dataset(ih, loader_of(x, labels), out_dir, FAULT_KWARGS, **FAULT_RUN)
    return result, count[0]


def _flip_bytes(path, n_bytes, seed):
    data = bytearray(open(path, "rb").read())
    positions = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n_bytes]
    for p in positions.tolist():
        data[p] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _truncate(path, size):
    with open(path, "r+b") as fh:
        fh.truncate(size)


def test_changed_model_method_or_settings_refuse_to_mix(tmp_path, monkeypatch):
    """A resume with other weights, buffers, method settings or arguments raises,
    naming what changed, and leaves the stored run as it was."""
    from captum_interactions._core.dataset import DatasetStorageError  # noqa: F401

    model, x, labels, _ = make_problem()
    crashing = IntegratedHessians(model)
    _interrupt_after(crashing, 2)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        explain_dataset(crashing, loader_of(x, labels), out, FAULT_KWARGS, **FAULT_RUN)
    before = {n: open(os.path.join(out, "chunks", n), "rb").read()
              for n in os.listdir(out / "chunks")}

    changed = make_problem()[0]
    with torch.no_grad():
        changed[2].bias[1] += 1e-9  # one float of one layer
    with pytest.raises(ValueError, match=r"model parameters differ \(layer '2\.bias'\)"):
        explain_dataset(IntegratedHessians(changed), loader_of(x, labels), out,
                        FAULT_KWARGS, **FAULT_RUN)
    with pytest.raises(ValueError, match=r"method setting 'multiply_by_inputs' \(was true, "
                                         r"now false\)"):
        explain_dataset(IntegratedHessians(model, multiply_by_inputs=False),
                        loader_of(x, labels), out, FAULT_KWARGS, **FAULT_RUN)
    with pytest.raises(ValueError, match=r"method \(was .*IntegratedHessians, now .*HOPE\)"):
        from captum_interactions import HOPE

        explain_dataset(HOPE(model), loader_of(x, labels), out, {"order": 2}, **FAULT_RUN)
    with pytest.raises(ValueError, match=r"attribute_kwargs\.n_steps \(was 4, now 5\)"):
        explain_dataset(IntegratedHessians(model), loader_of(x, labels), out,
                        {"n_steps": 5}, **FAULT_RUN)
    # a library whose defaults changed (here the quadrature rule) does not resume
    function = IntegratedHessians.attribute.__wrapped__
    monkeypatch.setattr(function, "__defaults__", tuple(
        "gausslog" if v == "gausslog_graded" else v for v in function.__defaults__))
    with pytest.raises(ValueError, match=r"default method \(was gausslog_graded, now "
                                         r"gausslog\)"):
        explain_dataset(IntegratedHessians(model), loader_of(x, labels), out,
                        FAULT_KWARGS, **FAULT_RUN)
    monkeypatch.undo()
    # a closure over the model is fingerprinted too
    closure_model = make_problem()[0]

    def forward(inputs):
        return closure_model(inputs)

    with torch.no_grad():
        closure_model[0].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"model parameters differ \(layer '0\.weight'\)"):
        explain_dataset(IntegratedHessians(forward), loader_of(x, labels), out,
                        FAULT_KWARGS, **FAULT_RUN)
    after = {n: open(os.path.join(out, "chunks", n), "rb").read()
             for n in os.listdir(out / "chunks")}
    assert after == before  # nothing was touched
    resumed, computed = _rerun(out)  # the original settings resume
    assert computed == N_EXAMPLES - 10
    expected = IntegratedHessians(model).attribute(x, target=labels, n_steps=4)
    torch.testing.assert_close(resumed.interactions(), expected, rtol=1e-12, atol=1e-14)


def test_changed_buffers_refuse_to_mix(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.BatchNorm1d(6), nn.Softplus(),
                          nn.Linear(6, 1)).to(DTYPE).eval()
    x = torch.randn(12, D_IN, dtype=DTYPE)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    explain_dataset(IntegratedHessians(model), loader, tmp_path, {"n_steps": 2}, progress=False)
    with torch.no_grad():
        model[1].running_var[3] *= 2
    with pytest.raises(ValueError, match=r"model buffers differ \(layer '1\.running_var'\)"):
        explain_dataset(IntegratedHessians(model), loader, tmp_path, {"n_steps": 2},
                        progress=False)


def test_changed_data_refuses_to_mix(tmp_path):
    model, x, labels, _ = make_problem()
    _reference_run(tmp_path)
    other = x.clone()
    other[12, 3] += 1e-12  # one value of example 12, in chunk 2 (examples 10-14)
    with pytest.raises(ValueError, match="inputs of chunk 2 \\(examples 10–14\\) differ"):
        explain_dataset(IntegratedHessians(model), loader_of(other, labels), tmp_path,
                        FAULT_KWARGS, **FAULT_RUN)
    relabeled = labels.clone()
    relabeled[21] = (relabeled[21] + 1) % D_OUT  # the targets are data too
    with pytest.raises(ValueError, match="inputs of chunk 4 \\(examples 20–22\\) differ"):
        explain_dataset(IntegratedHessians(model), loader_of(x, relabeled), tmp_path,
                        FAULT_KWARGS, **FAULT_RUN)
    # another dataset length changes the layout
    with pytest.raises(ValueError, match="num_examples \\(was 23, now 22\\)"):
        explain_dataset(IntegratedHessians(model), loader_of(x[:22], labels[:22]), tmp_path,
                        FAULT_KWARGS, **FAULT_RUN)
    fresh = explain_dataset(IntegratedHessians(model), loader_of(other, labels), tmp_path,
                            FAULT_KWARGS, resume=False, **FAULT_RUN)
    expected = IntegratedHessians(model).attribute(other, target=labels, n_steps=4)
    torch.testing.assert_close(fresh.interactions(), expected, rtol=1e-12, atol=1e-14)


def _swap(out_dir):
    a, b = _chunk_file(out_dir, 1), _chunk_file(out_dir, 3)
    os.replace(a, a + ".x")
    os.replace(b, a)
    os.replace(a + ".x", b)
    return [1, 3]


def _foreign(out_dir):
    other = make_problem(seed=1)[0]  # another model, same data and layout
    _reference_run(str(out_dir) + "_other", model=other)
    os.replace(_chunk_file(str(out_dir) + "_other", 2), _chunk_file(out_dir, 2))
    return [2]


def _bit_flips(out_dir):
    _flip_bytes(_chunk_file(out_dir, 3), 64, seed=0)
    return [3]


def _bit_flips_in_data(out_dir):
    path = _chunk_file(out_dir, 0)
    size = os.path.getsize(path)
    data = bytearray(open(path, "rb").read())
    for k in range(64):  # the last 64 bytes: the tensor payload
        data[size - 1 - k] ^= 0x01
    open(path, "wb").write(bytes(data))
    return [0]


def _truncated(out_dir):
    path = _chunk_file(out_dir, 1)
    _truncate(path, os.path.getsize(path) // 2)
    return [1]


def _empty(out_dir):
    _truncate(_chunk_file(out_dir, 4), 0)
    return [4]


@pytest.mark.parametrize(
    "damage, message",
    [
        (_swap, "holds chunk 3 .*not chunk 1"),
        (_foreign, "belongs to another run"),
        (_bit_flips, "damaged|cannot be read|another run|holds"),
        (_bit_flips_in_data, "does not match its sha256"),
        (_truncated, "cannot be read"),
        (_empty, "cannot be read \\(0 bytes"),
    ],
    ids=["swapped", "foreign", "64_flipped_bytes", "64_flipped_payload_bytes", "truncated_half",
         "empty"],
)
def test_damaged_chunk_is_named_on_load_and_recomputed_on_rerun(tmp_path, damage, message):
    from captum_interactions._core.dataset import DatasetStorageError

    out = tmp_path / "run"
    clean = _reference_run(out).interactions()
    damaged = damage(out)
    first = _chunk_file(out, damaged[0])
    result = DatasetExplanation.load(str(out))
    with pytest.raises(DatasetStorageError, match=message) as err:
        result.interactions()
    assert err.value.path == first and first in str(err.value)
    assert "rerun explain_dataset" in str(err.value)
    with pytest.raises(DatasetStorageError) as err:
        result[damaged[0] * 5]
    assert err.value.path == first
    with pytest.raises(DatasetStorageError, match=f"{len(damaged)} damaged chunk"):
        result.verify()

    with pytest.warns(RuntimeWarning) as caught:
        repaired, computed = _rerun(out)
    named = " ".join(str(w.message) for w in caught)
    for c in damaged:
        assert _chunk_file(out, c) in named
        assert os.path.exists(_chunk_file(out, c) + ".damaged")  # kept as evidence
    sizes = [5, 5, 5, 5, 3]
    assert computed == sum(sizes[c] for c in damaged)  # the sound chunks are kept
    assert torch.equal(repaired.interactions(), clean)
    repaired.verify()


def test_damaged_manifest_or_summary_is_named_and_repaired(tmp_path):
    from captum_interactions._core.dataset import DatasetStorageError

    out = tmp_path / "run"
    clean = _reference_run(out)
    manifest = out / "manifest.json"
    good = manifest.read_text()

    manifest.write_text(good[: len(good) // 2])  # not JSON
    with pytest.raises(DatasetStorageError, match="not valid JSON") as err:
        DatasetExplanation.load(str(out))
    assert err.value.path == str(manifest)
    with pytest.warns(RuntimeWarning, match=f"{manifest}.*not valid JSON"):
        repaired, computed = _rerun(out)
    assert computed == 0 and torch.equal(repaired.interactions(), clean.interactions())

    edited = json.loads(manifest.read_text())
    edited["num_chunks"] = 2  # half the chunks: must never give a partial result
    manifest.write_text(json.dumps(edited))
    with pytest.raises(DatasetStorageError, match="modified or damaged") as err:
        DatasetExplanation.load(str(out))
    assert err.value.path == str(manifest)
    # an edit that also recomputes the checksum is still caught by the layout check
    from captum_interactions._utils.dataset_storage import write_json

    write_json(str(manifest), {k: v for k, v in edited.items() if k != "sha256"})
    with pytest.raises(DatasetStorageError, match="num_chunks 2 for 23 examples"):
        DatasetExplanation.load(str(out))
    with pytest.warns(RuntimeWarning, match=f"{manifest} was edited .*num_chunks 2, expected "
                                            "num_chunks 5"):
        repaired, computed = _rerun(out)  # rewritten, the chunks kept
    assert computed == 0 and repaired.num_chunks == 5
    assert torch.equal(repaired.interactions(), clean.interactions())

    summary = out / "summary.safetensors"
    _flip_bytes(str(summary), 8, seed=1)
    with pytest.raises(DatasetStorageError) as err:
        DatasetExplanation.load(str(out))
    assert err.value.path == str(summary)
    os.remove(out / "summary.json")
    with pytest.raises(DatasetStorageError, match="is missing") as err:
        DatasetExplanation.load(str(out))
    repaired, computed = _rerun(out)
    assert computed == 0
    torch.testing.assert_close(repaired.mean_abs_interactions, clean.mean_abs_interactions,
                               rtol=0, atol=0)


class _NaNWhereFirstFeatureIsLarge(IntegratedHessians):
    """Integrated Hessians with NaN/inf planted where x_0 > 50 (a model that
    overflows there, say)."""

    def attribute(self, inputs, **kwargs):
        out = super().attribute(inputs, **kwargs)
        out = out.clone()
        out[inputs[:, 0] > 50, 0, 1] = float("nan")
        out[inputs[:, 0] > 150, 2, 2] = float("inf")
        return out


def test_nonfinite_examples_are_skipped_counted_and_named(tmp_path):
    model, x, labels, _ = make_problem()
    x = x.clone()
    x[7, 0], x[19, 0] = 100.0, 200.0
    method = _NaNWhereFirstFeatureIsLarge(model)
    with pytest.warns(RuntimeWarning, match=r"2 of 23 examples have non-finite .*"
                                            r"examples 7, 19\)"):
        result = explain_dataset(method, loader_of(x, labels), tmp_path, FAULT_KWARGS,
                                 dependence_pairs=[(0, 1), (1, 3)], top_k=3, **FAULT_RUN)
    assert result.nonfinite_examples == [7, 19] and result.num_finite == 21
    per_example = result.interactions()
    assert per_example[7, 0, 1].isnan() and per_example[19, 2, 2].isinf()  # kept as computed
    keep = torch.ones(N_EXAMPLES, dtype=torch.bool)
    keep[[7, 19]] = False
    finite = per_example[keep]
    torch.testing.assert_close(result.mean_interactions, finite.mean(0), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(result.mean_abs_interactions, finite.abs().mean(0),
                               rtol=1e-12, atol=1e-15)
    assert all(math_isfinite(v) for _, _, v in result.top_pairs) and len(result.top_pairs) == 3
    dep = result.dependence[(0, 1)]
    assert torch.equal(dep["index"], torch.arange(N_EXAMPLES)[keep])
    torch.testing.assert_close(dep["interaction"], finite[:, 0, 1])
    torch.testing.assert_close(dep["x_i"], x[keep, 0])
    reopened = DatasetExplanation.load(str(tmp_path))
    assert reopened.nonfinite_examples == [7, 19]


def math_isfinite(value):
    return value == value and abs(value) != float("inf")


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from captum_interactions import IntegratedHessians
    from captum_interactions._core.dataset import explain_dataset
    from tests.test_dataset import make_problem, loader_of, with_labels

    model, x, labels, _ = make_problem()
    ih = IntegratedHessians(model)
    inner = ih.attribute

    def slow(*args, **kwargs):
        time.sleep(0.25)
        return inner(*args, **kwargs)

    ih.attribute = slow
    explain_dataset(ih, loader_of(x, labels, batch_size=2), sys.argv[1], {"n_steps": 4},
                    batch_to_inputs=with_labels, chunk_size=2, progress=False)
    """
)


def test_second_run_on_a_live_folder_fails_clearly_or_waits(tmp_path):
    """A run in another process holds the folder: a second run with resume=False
    fails at once naming the folder and deletes nothing; with a lock_timeout
    it waits for the first to finish, then resumes its complete result."""
    model, x, labels, _ = make_problem()
    script = tmp_path / "hold.py"
    script.write_text(LOCK_HOLDER)
    out = tmp_path / "live"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env)
    args = (IntegratedHessians(model), loader_of(x, labels, batch_size=2), out, {"n_steps": 4})
    run = dict(batch_to_inputs=with_labels, chunk_size=2, progress=False)
    try:
        # wait until the first run is inside its loop (holding the lock); on a
        # loaded machine its imports alone can take a minute
        deadline, started = time.time() + 600, False
        while time.time() < deadline and proc.poll() is None:
            chunks = os.listdir(out / "chunks") if (out / "chunks").exists() else []
            if len([c for c in chunks if c.endswith(".safetensors")]) >= 2:
                started = True
                break
            time.sleep(0.02)
        assert started, "the first run did not write two chunks"
        assert proc.poll() is None, "the first run finished before the test could race it"
        with pytest.raises(TimeoutError, match=f"{out} is in use by another run.*pid "
                                               f"{proc.pid}.*lock_timeout=0.1"):
            explain_dataset(*args, resume=False, lock_timeout=0.1, **run)
        assert len(os.listdir(out / "chunks")) >= 2  # the live run's files are intact
        waited = explain_dataset(*args, lock_timeout=120, **run)
        assert proc.wait(timeout=60) == 0  # the first run was not disturbed
    finally:
        if proc.poll() is None:
            proc.kill()
    expected = IntegratedHessians(model).attribute(x, target=labels, n_steps=4)
    torch.testing.assert_close(waited.interactions(), expected, rtol=1e-12, atol=1e-14)


def test_storage_is_safetensors_and_json_readable_without_this_library(tmp_path):
    """Chunks and summaries open with the safetensors package alone (here its
    numpy reader: no torch, no pickle), and nothing in the reading path
    calls torch.load."""
    import inspect

    from safetensors import safe_open
    from safetensors.numpy import load_file

    import captum_interactions._core.dataset as runner
    import captum_interactions._utils.dataset_storage as storage

    result = _reference_run(tmp_path)
    arrays = load_file(_chunk_file(tmp_path, 1))
    assert (arrays["indices"] == list(range(5, 10))).all()
    torch.testing.assert_close(torch.from_numpy(arrays["interactions"]),
                               result.interactions()[5:10], rtol=0, atol=0)
    with safe_open(_chunk_file(tmp_path, 1), framework="numpy") as fh:
        meta = fh.metadata()
    assert meta["chunk"] == "1" and meta["start"] == "5" and meta["stop"] == "10"
    assert json.load(open(tmp_path / "summary.json"))["num_examples"] == N_EXAMPLES
    summary = load_file(str(tmp_path / "summary.safetensors"))
    torch.testing.assert_close(torch.from_numpy(summary["mean_abs"]),
                               result.mean_abs_interactions, rtol=0, atol=0)
    for module in (runner, storage):
        assert "torch.load(" not in inspect.getsource(module)


def test_old_format_folder_is_detected_and_never_unpickled(tmp_path, monkeypatch):
    from captum_interactions._core.dataset import DatasetStorageError

    out = tmp_path / "old"
    (out / "chunks").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"version": 1, "settings": {},
                                                   "num_chunks": 5, "complete": True}))
    (out / "chunks" / "chunk_000000.pt").write_bytes(b"not to be unpickled")
    (out / "summary.pt").write_bytes(b"not to be unpickled")

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(DatasetStorageError, match="old format 1 .*resume=False"):
        DatasetExplanation.load(str(out))
    model, x, labels, _ = make_problem()
    with pytest.raises(DatasetStorageError, match="old format 1"):
        explain_dataset(IntegratedHessians(model), loader_of(x, labels), out, FAULT_KWARGS,
                        **FAULT_RUN)
    fresh = explain_dataset(IntegratedHessians(model), loader_of(x, labels), out,
                            FAULT_KWARGS, resume=False, **FAULT_RUN)
    assert not (out / "summary.pt").exists() and not (out / "chunks" / "chunk_000000.pt").exists()
    assert len(fresh) == N_EXAMPLES


def test_model_fingerprint_reaches_the_model_however_it_is_wrapped():
    """The weights are found through a module, a bound method of a wrapper, a
    functools.partial and a closure, under the module's own parameter names;
    they depend on the bytes, not on the device or on other state."""
    import functools

    from captum_interactions._utils.dataset_storage import model_fingerprint

    model = make_problem()[0]

    class Wrapper:
        def __init__(self, net):
            self.net = net

        def forward(self, inputs):
            return self.net(inputs)

    def closure(inputs):
        return model(inputs)

    direct = model_fingerprint(model)
    assert list(direct) == ["parameter '0.bias'", "parameter '0.weight'",
                            "parameter '2.bias'", "parameter '2.weight'"]
    for wrapped in (model.forward, Wrapper(model).forward,
                    functools.partial(lambda net, inputs: net(inputs), model), closure):
        assert model_fingerprint(wrapped) == direct
    model.train()  # a flag, not a parameter
    assert model_fingerprint(model) == direct
    with torch.no_grad():
        model[0].weight[1, 1] = model[0].weight[1, 1].item()  # same bytes
    assert model_fingerprint(model) == direct
    with torch.no_grad():
        model[0].weight[1, 1] = torch.nextafter(model[0].weight[1, 1], torch.tensor(2.0,
                                                                                     dtype=DTYPE))
    changed = model_fingerprint(model)
    assert [k for k in direct if direct[k] != changed[k]] == ["parameter '0.weight'"]
