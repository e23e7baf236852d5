#!/usr/bin/env python3
"""Kept for imports of the old module path: the smoothing helpers live in
:mod:`captum_interactions._utils.smoothing`."""
from captum_interactions._utils.smoothing import (  # noqa: F401
    replace_relu_with_softplus,
    smooth_model,
)

__all__ = ["replace_relu_with_softplus", "smooth_model"]
