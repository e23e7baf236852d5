"""Each method on CUDA gives the CPU numbers (skipped without a GPU)."""
import copy

import pytest
import torch

from captum_interactions import ExpectedHessians, IntegratedHessians
from tests.test_integrated_hessians import TwoInputModel, softplus_mlp

pytestmark = pytest.mark.cuda
DTYPE = torch.float64


def _to(obj, device):
    return obj.to(device) if hasattr(obj, "to") else obj


def test_integrated_hessians_cuda_matches_cpu_and_stays_on_device():
    model = softplus_mlp().to("cpu")
    x = torch.randn(4, 5, dtype=DTYPE, device="cpu")
    mask = torch.tensor([[0, 0, 1, 2, 2]], device="cpu")
    ih_cpu = IntegratedHessians(model)
    ref, ref_delta = ih_cpu.attribute(x, target=[0, 1, 2, 0], return_convergence_delta=True)
    ref_g = ih_cpu.attribute(x, target=1, feature_mask=mask, internal_batch_size=5)
    model_gpu = softplus_mlp().to("cuda")
    ih = IntegratedHessians(model_gpu)
    out, delta = ih.attribute(
        x.cuda(), target=[0, 1, 2, 0], return_convergence_delta=True
    )
    assert out.device.type == "cuda" and delta.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(delta.cpu(), ref_delta, rtol=0, atol=1e-10)
    grouped = ih.attribute(x.cuda(), target=1, feature_mask=mask.cuda(), internal_batch_size=5)
    torch.testing.assert_close(grouped.cpu(), ref_g, rtol=1e-10, atol=1e-12)


def test_tuple_inputs_and_expected_hessians_on_cuda():
    model = TwoInputModel().cuda()
    a = torch.randn(2, 2, dtype=DTYPE, device="cuda")
    b = torch.randn(2, 3, 2, dtype=DTYPE, device="cuda")
    out = IntegratedHessians(model).attribute((a, b), target=0)
    assert all(block.device.type == "cuda" for row in out for block in row)
    torch.manual_seed(0)
    eh, delta = ExpectedHessians(softplus_mlp().cuda()).attribute(
        torch.randn(3, 5, dtype=DTYPE, device="cuda"),
        torch.randn(10, 5, dtype=DTYPE, device="cuda"),
        target=0,
        n_samples=64,
        return_convergence_delta=True,
    )
    assert eh.device.type == "cuda" and delta.abs().max() < 1.0


def _cpu_and_cuda(build):
    """The same float64 model on both devices (``build`` seeds itself)."""
    return build().to("cpu", DTYPE), build().to("cuda", DTYPE)


def _mlp(activation):
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 16), activation(), torch.nn.Linear(16, 3))

    return build


def test_smooth_hess_cuda_matches_cpu_with_the_same_noise():
    from captum_interactions import SmoothHess

    cpu, gpu = _cpu_and_cuda(_mlp(torch.nn.ReLU))
    x = torch.randn(3, 5, dtype=DTYPE)
    # the noise is drawn on the input's device, so the draws differ between devices
    out = SmoothHess(gpu).attribute(x.cuda(), target=1, stdevs=0.2, n_samples=4096,
                                    return_stderr=True)
    ref = SmoothHess(cpu).attribute(x, target=1, stdevs=0.2, n_samples=4096, return_stderr=True)
    assert out[0].device.type == "cuda"
    # two independent Monte Carlo estimates: equal within a few standard errors
    gap = (out[0].cpu() - ref[0]).abs()
    bound = 6 * (out[1].cpu() ** 2 + ref[1] ** 2).sqrt() + 1e-12
    assert (gap <= bound).all()


def test_hope_cuda_matches_cpu():
    from captum_interactions import HOPE

    cpu, gpu = _cpu_and_cuda(_mlp(torch.nn.Tanh))
    x = torch.randn(2, 5, dtype=DTYPE)
    ref = HOPE(cpu).expand(x, order=4, target=2)
    out = HOPE(gpu).expand(x.cuda(), order=4, target=2)
    assert out.coefficients.device.type == "cuda"
    torch.testing.assert_close(out.coefficients.cpu(), ref.coefficients, rtol=1e-10, atol=1e-12)


def test_contextual_decomposition_and_acd_cuda_match_cpu():
    from captum_interactions import (
        AgglomerativeContextualDecomposition,
        ContextualDecomposition,
    )

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(4 * 16, 3))

    cpu, gpu = _cpu_and_cuda(build)
    x = torch.randn(2, 1, 8, 8, dtype=DTYPE)
    mask = ((torch.arange(8)[:, None] // 4) * 2 + torch.arange(8)[None] // 4).view(1, 1, 8, 8)
    ref = ContextualDecomposition(cpu).interactions(x, feature_mask=mask, target=0)
    out = ContextualDecomposition(gpu).interactions(x.cuda(), feature_mask=mask.cuda(), target=0)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)
    ref_h = AgglomerativeContextualDecomposition(cpu).attribute(x[:1], target=0, block_size=2)
    out_h = AgglomerativeContextualDecomposition(gpu).attribute(x[:1].cuda(), target=0,
                                                                block_size=2)
    assert len(out_h.levels) == len(ref_h.levels)
    for a, b in zip(out_h.levels, ref_h.levels):
        torch.testing.assert_close(a.scores.cpu(), b.scores, rtol=1e-10, atol=1e-12)


def test_layer_integrated_hessians_cuda_matches_cpu():
    from captum_interactions import LayerIntegratedHessians

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 6, 8), torch.nn.GELU(),
                                   torch.nn.Linear(8, 1))

    cpu, gpu = _cpu_and_cuda(build)
    ids = torch.randint(1, 20, (2, 6))
    ref = LayerIntegratedHessians(cpu, cpu[0]).attribute(ids, baselines=torch.zeros_like(ids))
    out = LayerIntegratedHessians(gpu, gpu[0]).attribute(ids.cuda(),
                                                         baselines=torch.zeros_like(ids).cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)


def test_explain_dataset_on_cuda_matches_cpu(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from captum_interactions import explain_dataset

    cpu, gpu = _cpu_and_cuda(_mlp(torch.nn.Softplus))
    loader = DataLoader(TensorDataset(torch.randn(20, 5, dtype=DTYPE)), batch_size=6)
    kwargs = {"n_steps": 8, "target": 0}
    ref = explain_dataset(IntegratedHessians(cpu), loader, str(tmp_path / "cpu"), kwargs,
                          progress=False)
    out = explain_dataset(IntegratedHessians(gpu), loader, str(tmp_path / "cuda"), kwargs,
                          device="cuda", progress=False)
    torch.testing.assert_close(out.interactions().cpu(), ref.interactions(),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.mean_abs_interactions.cpu(), ref.mean_abs_interactions)


def test_kink_and_jump_checks_on_cuda():
    """HOPE's kink record (read once, at the end) and SmoothHess's jump check
    work on CUDA tensors as on the CPU; off the kinks the expansions agree."""
    import warnings

    from captum_interactions import HOPE, NonSmoothModelWarning, SmoothHess
    from tests.test_hope import _blank_image_cnn

    net, x, mask = _blank_image_cnn()
    gpu = copy.deepcopy(net).cuda()
    # (on a tie the element chosen may differ between devices: not compared)
    with pytest.warns(NonSmoothModelWarning, match=r"kink of max_pool2d"):
        HOPE(gpu).expand(x.cuda(), order=2, feature_mask=mask.cuda())
    moved = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1),
                                   dtype=x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_gpu = HOPE(gpu).expand(moved.cuda(), order=2, feature_mask=mask.cuda())
        on_cpu = HOPE(net).expand(moved, order=2, feature_mask=mask)
    torch.testing.assert_close(on_gpu.coefficients.cpu(), on_cpu.coefficients,
                               rtol=1e-10, atol=1e-12)
    with pytest.warns(NonSmoothModelWarning, match=r"discontinuous in its inputs: round"):
        SmoothHess(lambda v: (torch.round(3 * v) + v * v).sum(-1, keepdim=True)).attribute(
            torch.randn(2, 3, device="cuda"), n_samples=16)
