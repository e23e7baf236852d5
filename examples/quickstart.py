#!/usr/bin/env python3
"""Quickstart: pairwise interactions of a small network with Integrated Hessians."""
import torch
from torch import nn

from captum_interactions import ExpectedHessians, IntegratedHessians, replace_relu_with_softplus

torch.manual_seed(0)
# a ReLU network that learns f(x) = x0 * x1 + x2 (one true interaction: x0 with x1)
model = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
data = torch.randn(2048, 3)
labels = data[:, :1] * data[:, 1:2] + data[:, 2:3]
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(400):
    optimizer.zero_grad()
    loss = ((model(data) - labels) ** 2).mean()
    loss.backward()
    optimizer.step()
print(f"training loss {loss.item():.4f}")

x = torch.tensor([[1.0, 1.5, -0.5]])
with replace_relu_with_softplus(model, beta=10.0):  # ReLU nets have no Hessian
    gamma, delta = IntegratedHessians(model).attribute(x, return_convergence_delta=True)
    expected = ExpectedHessians(model).attribute(x, baselines=data[:200], n_samples=256)
print("Integrated Hessians (zero baseline), rows/columns = x0, x1, x2:")
print(gamma[0].detach().numpy().round(3))
print(f"completeness error: {delta.item():.2e}")
print("Expected Hessians (training-data baselines):")
print(expected[0].detach().numpy().round(3))
