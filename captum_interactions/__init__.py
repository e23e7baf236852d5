#!/usr/bin/env python3
"""Second- and higher-order (interaction) attributions for PyTorch, as a Captum plugin."""

__version__ = "0.1.0"

# Public names. Each method module adds its import here.
from captum_interactions._core.expected_hessians import ExpectedHessians  # noqa: F401
from captum_interactions._core.integrated_hessians import IntegratedHessians  # noqa: F401
from captum_interactions._utils.smoothing import (  # noqa: F401
    replace_relu_with_softplus,
    smooth_model,
)
from captum_interactions._core.dataset import DatasetExplanation, explain_dataset  # noqa: F401
from captum_interactions._utils.dataset_storage import DatasetStorageError  # noqa: F401
from captum_interactions._core.smooth_hess import SmoothHess  # noqa: F401
from captum_interactions._core.contextual_decomposition import ContextualDecomposition  # noqa: F401
from captum_interactions._core.agglomerative_contextual_decomposition import (  # noqa: F401
    AgglomerativeContextualDecomposition,
    Hierarchy,
)
from captum_interactions._core.hope import HOPE  # noqa: F401
from captum_interactions._utils.taylor_polynomial import TaylorPolynomial  # noqa: F401
from captum_interactions._core.layer.layer_integrated_hessians import LayerIntegratedHessians  # noqa: F401
from captum_interactions._utils.memory import (  # noqa: F401
    MemoryBudgetError,
    get_memory_budget,
    memory_budget,
    set_memory_budget,
)
from captum_interactions._core.llm_attr import LLMInteractionAttribution, LLMInteractionResult  # noqa: F401
from captum_interactions.tables import InteractionTable, TopInteraction, top_interactions  # noqa: F401
from captum_interactions.interop import from_shapiq, to_shapiq  # noqa: F401
from captum_interactions._utils.nonsmooth import NonSmoothModelWarning  # noqa: F401
from captum_interactions._utils.common import NonFiniteResultWarning  # noqa: F401
