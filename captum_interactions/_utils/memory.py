#!/usr/bin/env python3
"""The memory budget every method plans its work within.

Before allocating, each method estimates the bytes of its output and of its
working memory per unit of work (a Hessian-vector product, a gradient row, a
Taylor direction), picks the largest chunk that keeps output + working memory
within the budget, and raises :class:`MemoryBudgetError` (a ``ValueError``)
naming the argument to change and the bytes needed when even the output (plus
the smallest chunk) cannot fit. Chunking never changes results.

The budget, in bytes, is resolved in this order:

1. :func:`set_memory_budget` / the :func:`memory_budget` context manager
   (process-wide, like ``torch.set_default_dtype``);
2. the environment variable ``CAPTUM_INTERACTIONS_MEMORY_BUDGET`` (bytes, or a
   number with a unit: ``"2GB"``, ``"512MiB"``);
3. a default derived from the device of the inputs: half of the free memory
   of that CUDA device (``torch.cuda.mem_get_info``), or half of the
   ``MemAvailable`` of ``/proc/meminfo`` on CPU (half of the physical memory
   where that file does not exist).

Estimates are coarse by design (documented factors, activation sizes measured
with forward hooks on the model's leaf modules where the model is an
``nn.Module``); the tests check that a budget-limited call stays within a
small factor of the budget.
"""
import contextlib
import math
import os
import re
import time
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch

#: environment variable holding a budget in bytes (or with a unit suffix)
ENV_VAR = "CAPTUM_INTERACTIONS_MEMORY_BUDGET"
#: fraction of the free device memory used when no budget is set
DEFAULT_FRACTION = 0.5

_override: Optional[int] = None

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}


class MemoryBudgetError(ValueError):
    """A call needs more memory than the budget allows, even fully chunked."""


def parse_bytes(value: Union[int, float, str], name: str = "budget") -> int:
    """``1_000_000``, ``"1e9"``, ``"2GB"``, ``"512 MiB"`` -> bytes (int > 0)."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number of bytes or a string like '2GB', got a bool")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"`{name}` must be a number of bytes or a string like '2GB' or "
                f"'512MiB', got {value!r}"
            )
        try:
            number = float(match.group(1)) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"`{name}`: cannot read a number from {value!r}") from None
    else:
        raise TypeError(
            f"`{name}` must be a number of bytes or a string like '2GB', got "
            f"{type(value).__name__}"
        )
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"`{name}` must be a positive, finite number of bytes, got {value!r}")
    return int(number)


def set_memory_budget(budget: Union[None, int, float, str]) -> Optional[int]:
    r"""Set the process-wide memory budget of every method; returns the previous one.

    Args:
        budget (int, float, str or None): bytes (``2 * 2**30``) or a string
            with a unit (``"2GB"``, ``"512MiB"``). None goes back to the
            environment variable ``CAPTUM_INTERACTIONS_MEMORY_BUDGET`` or, if
            unset, to half of the free memory of the inputs' device.

    Returns:
        **previous** (int or None): the budget set before, None if none was.

    Examples::

        >>> import captum_interactions
        >>> previous = captum_interactions.set_memory_budget("4GB")
        >>> captum_interactions.get_memory_budget()
        4000000000
        >>> _ = captum_interactions.set_memory_budget(previous)
    """
    global _override
    previous = _override
    _override = None if budget is None else parse_bytes(budget)
    return previous


@contextlib.contextmanager
def memory_budget(budget: Union[None, int, float, str]) -> Iterator[None]:
    r"""Context manager: :func:`set_memory_budget` for the ``with`` block only.

    Examples::

        >>> import torch
        >>> from captum_interactions import IntegratedHessians, memory_budget
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 1))
        >>> with memory_budget("256MB"):
        ...     gamma = IntegratedHessians(model).attribute(torch.randn(2, 3))
    """
    previous = set_memory_budget(budget)
    try:
        yield
    finally:
        global _override
        _override = previous


#: how long a reading of the host's free memory is reused (seconds): calls of
#: a few milliseconds would otherwise spend a noticeable part reading /proc
_HOST_READING_TTL = 0.5
_host_reading: Tuple[float, int] = (-float("inf"), 0)


def _available_cpu_bytes() -> int:
    global _host_reading
    now = time.monotonic()
    if now - _host_reading[0] > _HOST_READING_TTL:
        _host_reading = (now, _read_available_cpu_bytes())
    return _host_reading[1]


def _read_available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_memory_budget(device: Union[None, str, torch.device] = None) -> int:
    """Half of the free memory of ``device`` (CUDA) or of the host (anything else)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, int(free * DEFAULT_FRACTION))
    return max(1, int(_available_cpu_bytes() * DEFAULT_FRACTION))


def get_memory_budget(device: Union[None, str, torch.device] = None) -> int:
    r"""The memory budget in bytes for work on ``device`` (see the module docs).

    Args:
        device (torch.device or str, optional): where the work runs; only used
            for the default (no budget set, no environment variable).
            Default: None (CPU)

    Returns:
        **budget** (int): bytes.
    """
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR)
    if env:
        return parse_bytes(env, name=ENV_VAR)
    return default_memory_budget(device)


def format_bytes(num_bytes: float) -> str:
    """Bytes in decimal units with three significant digits (``25.6 GB``)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:.3g} {unit}"
    return f"{int(num_bytes)} B"


def budget_error(method: str, needed: int, budget: int, what: str, fix: str) -> MemoryBudgetError:
    """The error of a call whose output (plus the smallest chunk) cannot fit."""
    return MemoryBudgetError(
        f"{method} needs at least {format_bytes(needed)} ({needed} bytes: {what}) but "
        f"the memory budget is {format_bytes(budget)} ({budget} bytes). {fix} Or raise "
        f"the budget: captum_interactions.set_memory_budget(...), the "
        f"captum_interactions.memory_budget(...) context manager or the "
        f"{ENV_VAR} environment variable."
    )


def smooth_hess_rows(
    num_examples: int,
    num_features: int,
    num_groups: int,
    itemsize: int,
    rows_per_unit: int,
    with_stderr: bool,
    noise_numel: int,
    internal_batch_size: Optional[int],
    budget: int,
) -> int:
    """Gradient rows per pass of SmoothHess within ``budget`` (an internal batch size).

    Fixed: the (N, G, G) accumulators (one, three more with standard errors),
    the einsum temporary and the symmetrized result (two), and a block of
    noise. Per gradient row: the graph of a plain backward (~4 x (D + A), with
    A assumed 8 D) and six D-sized vectors (noise, points, gradients, products).
    """
    d, g = num_features, num_groups
    output_bytes = num_examples * g * g * itemsize
    fixed = (3 + (3 if with_stderr else 0)) * output_bytes + noise_numel * itemsize
    row_bytes = (4 * (d + 8 * d) + 6 * d + 3 * g) * itemsize
    available = budget - fixed
    if available < rows_per_unit * row_bytes:
        needed = fixed + rows_per_unit * row_bytes
        raise budget_error(
            "SmoothHess",
            needed,
            budget,
            f"the {g} x {g} smoothed Hessian of {num_examples} example(s) takes "
            f"{format_bytes(output_bytes)} per accumulator, plus one gradient "
            f"{'pair' if rows_per_unit == 2 else 'row'}",
            "Pass a `feature_mask` with fewer groups (the output is N x G x G), "
            "`return_stderr=False`, or fewer examples per call; "
            "`internal_batch_size` cannot help, the work is already chunked to "
            "one gradient evaluation.",
        )
    rows = int(available // row_bytes)
    if internal_batch_size is not None:
        rows = min(rows, internal_batch_size)
    return max(rows_per_unit, rows)


#: activations per row (x the input features) assumed before they are measured
ACTIVATION_PRIOR = 8

#: HOPE working memory per propagated row: this many (K + 1)-coefficient
#: copies of the row's width (input features + measured activations)
HOPE_ROW_FACTOR = 6
#: Python objects of the recovery tables, bytes per integer entry (coarse)
HOPE_TABLE_ENTRY_BYTES = 48


def hope_fixed_bytes(
    num_variables: int,
    orders: "list[int]",
    num_examples: int,
    itemsize: int,
    derivative_order: Optional[int] = None,
) -> "tuple[int, int, str]":
    """(fixed bytes, output bytes, description) of a HOPE call, before any allocation.

    Counts the recovery tables (a C(d-1, s-1)^2 block per order d and support
    size s, built in Python), the univariate coefficients of every direction,
    the monomial coefficients (the output of ``expand``) and, for ``attribute``,
    the (N, p, ..., p) derivative tensor and the index tables that build it
    (~(3k + 4) int64 per entry).
    """
    p = num_variables
    top = max(orders)
    tables = 0
    for d in orders:
        if d == 0:
            continue
        for s in range(1, min(d, p) + 1):
            n_full = math.comb(d - 1, s - 1)
            n_all = math.comb(s + d - 1, d)
            tables += n_full * n_full * HOPE_TABLE_ENTRY_BYTES
            tables += math.comb(p, s) * n_all * 8 * 2
    directions = math.comb(p + top - 1, top)
    coefficients = sum(math.comb(p + d - 1, d) for d in orders)
    univariate = 2 * (top + 1) * directions * num_examples * itemsize
    output = num_examples * coefficients * itemsize + coefficients * p * 8
    what = (
        f"recovery tables ~{format_bytes(tables)}, {coefficients} Taylor coefficients "
        f"per example"
    )
    if derivative_order is not None:
        entries = p ** derivative_order
        output = num_examples * entries * itemsize
        tables += (3 * derivative_order + 4) * entries * 8
        what += (
            f", the order-{derivative_order} derivative tensor of {p}^{derivative_order} "
            f"= {entries} entries per example ({format_bytes(output)}) and its index tables"
        )
    return tables + univariate + 2 * output, output, what


def hope_directions_per_chunk(
    fixed_bytes: int,
    num_examples: int,
    order: int,
    width: float,
    itemsize: int,
    internal_batch_size: Optional[int],
    budget: int,
) -> int:
    """Directions propagated at once within ``budget`` (each is N rows of K + 1
    coefficients of ``width`` numbers, a few copies)."""
    direction_bytes = int(HOPE_ROW_FACTOR * (order + 1) * width * itemsize * num_examples)
    per_chunk = (budget - fixed_bytes) // max(direction_bytes, 1)
    if internal_batch_size is not None:
        per_chunk = min(per_chunk, max(1, internal_batch_size // num_examples))
    return int(max(1, per_chunk))


#: contextual decomposition: bytes per row = this many copies of (D + A)
#: (relevant, irrelevant and total parts, and the temporaries of a rule)
CD_ROW_FACTOR = 6


def cd_masks_per_chunk(
    num_masks: int,
    num_examples: int,
    num_features: int,
    mask_rows: int,
    itemsize: int,
    internal_batch_size: Optional[int],
    budget: int,
    activations_per_row: Optional[float] = None,
    method: str = "ContextualDecomposition",
) -> int:
    """Masks decomposed per forward pass within ``budget`` (each is N rows).

    Fixed: the boolean masks (M x rows x D bytes). Per row: ``CD_ROW_FACTOR``
    copies of the input features and the model's activations (``A``: measured,
    or ACTIVATION_PRIOR x D before they are)."""
    d = num_features
    a = ACTIVATION_PRIOR * d if activations_per_row is None else activations_per_row
    fixed = num_masks * mask_rows * d
    mask_bytes = int(CD_ROW_FACTOR * (d + a) * itemsize * num_examples)
    if fixed + mask_bytes > budget:
        raise budget_error(
            method,
            fixed + mask_bytes,
            budget,
            f"{num_masks} masks over {d} features ({format_bytes(fixed)}) and one "
            f"decomposition of {num_examples} example(s)",
            "Pass a `feature_mask` with fewer groups (interactions need G(G+1)/2 "
            "masks), or fewer examples per call.",
        )
    per_chunk = (budget - fixed) // mask_bytes
    if internal_batch_size is not None:
        per_chunk = min(per_chunk, max(1, internal_batch_size // num_examples))
    return int(max(1, min(per_chunk, num_masks)))


def leaf_modules(forward_func: Callable) -> List[torch.nn.Module]:
    """Leaf submodules of the ``nn.Module`` behind ``forward_func`` (none for a plain function)."""
    from captum_interactions._utils.common import model_modules

    return [
        m for root in model_modules(forward_func) for m in root.modules()
        if next(iter(m.children()), None) is None
    ]


class ActivationMeter:
    """Counts the elements of every leaf module's outputs during a forward pass.

    Used to estimate the activation memory per row of a batch (the autograd
    graph of a double backward holds a few times that). Hooks are removed on
    exit, even on error. ``enabled=False`` measures nothing (no hooks).
    """

    def __init__(self, forward_func: Callable, enabled: bool = True) -> None:
        self.modules = leaf_modules(forward_func) if enabled else []
        self.numel = 0
        self.measured = bool(self.modules)
        self._handles: list = []

    def _hook(self, module, args, output) -> None:
        stack = [output]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                self.numel += item.numel()
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())

    def __enter__(self) -> "ActivationMeter":
        try:
            for module in self.modules:
                self._handles.append(module.register_forward_hook(self._hook))
        except RuntimeError:  # e.g. a TorchScript module: no measurement
            self.__exit__()
            self.measured = False
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = [
    "ENV_VAR",
    "DEFAULT_FRACTION",
    "MemoryBudgetError",
    "set_memory_budget",
    "memory_budget",
    "get_memory_budget",
    "default_memory_budget",
    "parse_bytes",
    "format_bytes",
    "budget_error",
    "ActivationMeter",
]
