"""Each method on CUDA gives the CPU numbers (skipped without a GPU)."""
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
