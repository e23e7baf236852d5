#!/usr/bin/env python3
"""Swap ReLU for Softplus(beta) inside a model, temporarily."""
import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.Tensor.relu}
_INPLACE_RELU_FUNCTIONS = {F.relu_, torch.relu_, torch.Tensor.relu_}


class _ReluToSoftplusMode(TorchFunctionMode):
    """Redirects functional ReLU calls to Softplus(beta) while active."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def __torch_function__(
        self,
        func: Callable,
        types: Any,
        args: Tuple[Any, ...] = (),
        kwargs: Optional[Dict[str, Any]] = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _RELU_FUNCTIONS or func in _INPLACE_RELU_FUNCTIONS:
            inplace = func in _INPLACE_RELU_FUNCTIONS or kwargs.get("inplace", False)
            if len(args) > 1 and func is F.relu:
                inplace = inplace or bool(args[1])
            x = args[0]
            if inplace:
                # softplus saves its input for backward: give it a copy, then
                # overwrite x as the in-place ReLU would have
                return x.copy_(F.softplus(x.clone(), beta=self.beta))
            return F.softplus(x, beta=self.beta)
        return func(*args, **kwargs)


@contextlib.contextmanager
def replace_relu_with_softplus(model: nn.Module, beta: float = 10.0) -> Iterator[nn.Module]:
    r"""
    Temporarily replace every ReLU of ``model`` with Softplus(beta).

    ReLU networks are piecewise linear: their Hessian is zero almost
    everywhere, so second-order methods (Integrated/Expected Hessians, HOPE)
    see no interactions. Janizek et al. explain such networks through the
    Softplus(beta) network, which tends to the ReLU network as beta grows.

    Inside the ``with`` block, every ``nn.ReLU`` submodule is replaced by
    ``nn.Softplus(beta)`` and the functional calls ``F.relu``, ``torch.relu``,
    ``Tensor.relu`` (and their in-place forms) made during the model's forward
    are redirected to ``F.softplus(x, beta)``. The original modules and forward
    are restored on exit, also when the block raises. Functional calls outside
    the model's forward are not affected.

    Args:
        model (nn.Module): the model to modify in place for the block's duration.
        beta (float, optional): sharpness of the softplus,
            ``softplus(x) = log(1 + exp(beta x)) / beta``. Default: 10.0

    Yields:
        nn.Module: ``model`` itself (with the swapped activations).

    Examples::

        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(),
        ...                             torch.nn.Linear(4, 1))
        >>> with replace_relu_with_softplus(model, beta=5.0):
        ...     gamma = IntegratedHessians(model).attribute(torch.randn(3, 2))
        >>> type(model[1]).__name__
        'ReLU'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 < beta < float("inf"):
        raise ValueError(f"`beta` must be a finite number > 0, got {beta!r}")
    beta = float(beta)
    replaced: List[Tuple[nn.Module, str, nn.Module]] = []
    handles = []
    mode_stack: List[_ReluToSoftplusMode] = []

    def enter_mode(module: nn.Module, args: Any) -> None:
        mode = _ReluToSoftplusMode(beta)
        mode.__enter__()
        mode_stack.append(mode)

    def exit_mode(module: nn.Module, args: Any, output: Any) -> None:
        if mode_stack:
            mode_stack.pop().__exit__(None, None, None)

    try:
        for parent in model.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.ReLU:
                    softplus = nn.Softplus(beta=beta)
                    softplus.train(child.training)
                    setattr(parent, name, softplus)
                    replaced.append((parent, name, child))
        handles.append(model.register_forward_pre_hook(enter_mode))
        handles.append(model.register_forward_hook(exit_mode, always_call=True))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        while mode_stack:
            mode_stack.pop().__exit__(None, None, None)
        for parent, name, child in reversed(replaced):
            setattr(parent, name, child)
