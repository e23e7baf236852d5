import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

# CAPTUM_INTERACTIONS_TEST_DEVICE=cuda runs the whole suite with CUDA as torch's
# default device (models and tensors the tests create land on the GPU).
TEST_DEVICE = os.environ.get("CAPTUM_INTERACTIONS_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
