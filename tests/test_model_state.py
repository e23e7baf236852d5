"""Every method leaves the model as it was and explains each example on its own.

A train-mode model with BatchNorm (non-trivial running statistics) and Dropout:
after a call, and after a call that raises inside the forward, the buffers and
train/eval flags are bit-for-bit unchanged and no hook is left behind; example
0's result is the same whether it is batched with examples A or with examples B.
"""
import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_globals

from captum_interactions import (
    HOPE,
    AgglomerativeContextualDecomposition,
    ContextualDecomposition,
    ExpectedHessians,
    IntegratedHessians,
    LayerIntegratedHessians,
    SmoothHess,
)

DTYPE = torch.float64


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(6, 2)
        self.fail = False
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(6))
            self.bn.running_var.copy_(torch.rand(6) + 0.5)
            self.bn.weight.copy_(torch.rand(6) + 0.5)
            self.bn.bias.copy_(torch.randn(6))
            self.bn.num_batches_tracked.fill_(7)

    def forward(self, x):
        h = self.bn(self.fc1(x))
        if self.fail:
            raise RuntimeError("boom inside the forward")
        return self.fc2(self.drop(torch.tanh(h)))


def make_model():
    return BatchNormNet().to(DTYPE).train()


BACKGROUND = torch.randn(5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


def run_ih(model, x):
    return IntegratedHessians(model).attribute(x, target=1, n_steps=4)


def run_eh(model, x):
    torch.manual_seed(3)
    return ExpectedHessians(model).attribute(x, baselines=BACKGROUND, target=1, n_samples=6)


def run_layer_ih(model, x):
    return LayerIntegratedHessians(model, model.fc1).attribute(
        x, target=1, n_steps=4, feature_mask="full"
    )


def run_smooth_hess(model, x):
    torch.manual_seed(3)
    return SmoothHess(model).attribute(x, target=1, n_samples=8, stdevs=0.1)


def run_hope(model, x):
    return HOPE(model).attribute(x, order=2, target=1)


def run_cd(model, x):
    return ContextualDecomposition(model).interactions(x, target=1)


class PerExample(list):
    """One entry per example (ACD returns one hierarchy per example)."""


def run_acd(model, x):
    hierarchies = AgglomerativeContextualDecomposition(model).attribute(
        x, target=1, structure="sequence"
    )
    return PerExample(
        [lvl.scores for lvl in h.levels] + [g for lvl in h.levels for g in lvl.groups]
        for h in hierarchies
    )


METHODS = {
    "IntegratedHessians": run_ih,
    "ExpectedHessians": run_eh,
    "LayerIntegratedHessians": run_layer_ih,
    "SmoothHess": run_smooth_hess,
    "HOPE": run_hope,
    "ContextualDecomposition": run_cd,
    "AgglomerativeContextualDecomposition": run_acd,
}
# HOPE refuses a train-mode model (dropout/batch statistics mix the directions
# of its expansion) with an error naming the cause and the fix; every other
# method runs the model in eval mode for the call.
RAISES_IN_TRAIN_MODE = {"HOPE": "dropout|batch_norm"}


def snapshot(model):
    return (
        [m.training for m in model.modules()],
        [(name, b.clone()) for name, b in model.named_buffers()],
        [p.detach().clone() for p in model.parameters()],
    )


def assert_unchanged(model, before):
    flags, buffers, params = before
    assert [m.training for m in model.modules()] == flags
    now = list(model.named_buffers())
    assert [n for n, _ in now] == [n for n, _ in buffers]
    for (name, old), (_, new) in zip(buffers, now):
        assert new.dtype == old.dtype and torch.equal(new, old), name
    for old, new in zip(params, model.parameters()):
        assert torch.equal(old, new.detach())
    assert all(p.grad is None for p in model.parameters())


def hook_counts(model):
    per_module = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    global_hooks = (
        len(module_globals._global_forward_hooks),
        len(module_globals._global_forward_pre_hooks),
        len(module_globals._global_backward_hooks),
    )
    return per_module, global_hooks


def first_example(result):
    if isinstance(result, PerExample):
        return result[0]
    if isinstance(result, torch.Tensor):
        return result[0]
    if isinstance(result, (tuple, list)):
        return [first_example(r) for r in result]
    return result


def assert_same(a, b):
    if isinstance(a, list):
        for x, y in zip(a, b):
            assert_same(x, y)
        return
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        return
    assert a == b


@pytest.mark.parametrize("name", list(METHODS))
def test_state_unchanged_and_batch_independent(name):
    run = METHODS[name]
    model = make_model()
    x0 = torch.randn(1, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    others_a = torch.randn(2, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(6))
    others_b = 3 * torch.randn(2, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    before, hooks = snapshot(model), hook_counts(model)

    if name in RAISES_IN_TRAIN_MODE:
        with pytest.raises(ValueError, match=RAISES_IN_TRAIN_MODE[name]) as err:
            run(model, torch.cat([x0, others_a]))
        assert "eval()" in str(err.value)
        assert_unchanged(model, before)
        assert hook_counts(model) == hooks
        model.eval()  # then the method explains each example on its own
        before = snapshot(model)

    result_a = run(model, torch.cat([x0, others_a]))
    assert_unchanged(model, before)
    assert hook_counts(model) == hooks
    result_b = run(model, torch.cat([x0, others_b]))
    assert_unchanged(model, before)
    assert_same(first_example(result_a), first_example(result_b))

    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        run(model, torch.cat([x0, others_a]))
    assert_unchanged(model, before)
    assert hook_counts(model) == hooks


@pytest.mark.parametrize("name", ["IntegratedHessians", "ExpectedHessians",
                                  "LayerIntegratedHessians", "SmoothHess"])
def test_train_mode_model_gives_the_eval_mode_result(name):
    """The call evaluates the model in eval mode: the same numbers as model.eval()."""
    run = METHODS[name]
    x = torch.randn(3, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(8))
    train_result = run(make_model(), x)
    eval_result = run(make_model().eval(), x)
    assert_same(train_result, eval_result)


@pytest.mark.parametrize("name", ["IntegratedHessians", "ExpectedHessians",
                                  "LayerIntegratedHessians", "SmoothHess"])
def test_batchnorm_without_running_statistics_is_refused(name):
    model = make_model()
    model.bn = nn.BatchNorm1d(6, track_running_stats=False).to(DTYPE)
    before, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(ValueError, match="running statistics.*track_running_stats"):
        METHODS[name](model, torch.randn(3, 4, dtype=DTYPE))
    assert_unchanged(model, before)
    assert hook_counts(model) == hooks


def test_model_reached_through_a_lambda_is_switched_and_restored():
    """forward_func need not be the module: a closure over it works the same."""
    model = make_model()
    before, hooks = snapshot(model), hook_counts(model)
    x = torch.randn(3, 4, dtype=DTYPE)
    via_lambda = IntegratedHessians(lambda v: model(v)[:, 1]).attribute(x, n_steps=4)
    assert_unchanged(model, before)
    assert hook_counts(model) == hooks
    torch.testing.assert_close(via_lambda, run_ih(make_model().eval(), x), rtol=1e-12,
                               atol=1e-12)


def test_module_found_only_when_called_is_switched_and_restored():
    """A model hidden from inspection (held in a dict) is switched when first called."""
    holder = {"model": make_model()}
    model = holder["model"]
    before, hooks = snapshot(model), hook_counts(model)

    class Hidden:
        def __call__(self, v):
            return holder["model"](v)[:, 1]

    x = torch.randn(3, 4, dtype=DTYPE)
    result = IntegratedHessians(Hidden()).attribute(x, n_steps=4)
    assert_unchanged(model, before)
    assert hook_counts(model) == hooks
    torch.testing.assert_close(result, run_ih(make_model().eval(), x), rtol=1e-12, atol=1e-12)
