#!/usr/bin/env python3
r"""Explain a whole dataset: chunked, resumable, distributed, with global summaries.

:func:`explain_dataset` runs an interaction method of this library over a
``DataLoader`` and streams per-example matrices to disk in chunk files, while
it accumulates the global summaries (mean Gamma, mean abs(Gamma), top pairs,
dependence-plot data) without holding every matrix in memory. Under
``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU) every rank
explains its own chunks and the summaries are reduced across ranks.

Layout of ``out_dir``::

    manifest.json              settings of the run (a rerun must match them) and progress
    chunks/chunk_000000.pt     {"indices", "interactions", "sum", "abs_sum", "dependence"}
    summary.pt, summary.json   the global summaries (written by rank 0 at the end)
"""
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from captum_interactions._utils.distributed import (
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_from_rank0,
    distributed_context,
    rank_chunks,
)
from captum_interactions._utils.feature_groups import flatten_features

MANIFEST_NAME = "manifest.json"
SUMMARY_NAME = "summary.pt"
CHUNK_DIR = "chunks"
FORMAT_VERSION = 1


def _chunk_path(out_dir: str, chunk: int) -> str:
    return os.path.join(out_dir, CHUNK_DIR, f"chunk_{chunk:06d}.pt")


def _atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``.

    ``os.replace`` is atomic on POSIX and Windows: a reader (or a rerun after a
    crash) sees either no file or the whole file, never a truncated one.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        if path.endswith(".json"):
            with open(tmp, "w") as fh:
                json.dump(obj, fh, indent=2, sort_keys=True)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: str) -> Dict[str, Any]:
    # mmap: summary fields of a chunk are read without paging in its matrices
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _fingerprint(value: Any) -> Any:
    """A JSON-able description of a setting; tensors by shape, dtype and content hash."""
    if isinstance(value, Tensor):
        data = value.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        digest = hashlib.sha1(raw).hexdigest()
        return {"tensor": list(data.shape), "dtype": str(data.dtype), "sha1": digest}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _fingerprint(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__name__)
        return f"callable:{getattr(value, '__module__', '')}.{name}"
    return repr(value)


def _chunk_seed(seed: int, chunk: int) -> int:
    # distinct, well-spread 63-bit seeds per chunk, the same for any world size
    digest = hashlib.sha256(f"{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def default_batch_to_inputs(batch: Any) -> Dict[str, Any]:
    """The default ``batch_to_inputs``: a tensor is the inputs; from a list or
    tuple (e.g. ``TensorDataset(x, y)``) the first element is the inputs and the
    rest (labels) is ignored; a dict must hold ``"inputs"``."""
    if isinstance(batch, Tensor):
        return {"inputs": batch}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (Tensor, tuple)):
        return {"inputs": batch[0]}
    if isinstance(batch, dict) and "inputs" in batch:
        return dict(batch)
    raise TypeError(
        "explain_dataset could not find the inputs in a batch of type "
        f"{type(batch).__name__}; pass `batch_to_inputs`, a callable that maps a "
        "batch to the inputs or to a dict of attribute() arguments with an "
        "'inputs' key (e.g. lambda b: {'inputs': b[0], 'target': b[1]})"
    )


def _as_kwargs(mapped: Any) -> Dict[str, Any]:
    if isinstance(mapped, dict):
        if "inputs" not in mapped:
            raise ValueError("`batch_to_inputs` returned a dict without an 'inputs' key")
        return dict(mapped)
    if isinstance(mapped, (Tensor, tuple)):
        return {"inputs": mapped}
    raise TypeError(
        "`batch_to_inputs` must return a Tensor, a tuple of Tensors or a dict of "
        f"attribute() arguments, got {type(mapped).__name__}"
    )


def _flat_matrix(output: Any, num_examples: int, method_name: str) -> Tensor:
    """A method's output as one (N, D, D) matrix over the flattened features.

    (N, *F, *F) and (N, G, G) tensors are reshaped; a tuple-of-tuples output
    (several input tensors) becomes one block matrix over the concatenated
    features, in the order of :func:`flatten_features`.
    """
    if isinstance(output, Tensor):
        if output.dim() < 3 or output.shape[0] != num_examples:
            raise ValueError(
                f"{method_name} returned shape {tuple(output.shape)}; "
                f"explain_dataset needs (N, *F, *F) or (N, G, G) with N = {num_examples}"
            )
        size = output[0].numel()
        d = math.isqrt(size)
        if d * d != size:
            raise ValueError(
                f"{method_name} returned per-example shape {tuple(output.shape[1:])}, "
                "which is not a square (*F, *F) interaction matrix"
            )
        return output.reshape(num_examples, d, d)
    if (
        isinstance(output, tuple)
        and output
        and all(isinstance(row, tuple) and len(row) == len(output) for row in output)
        and all(isinstance(block, Tensor) for row in output for block in row)
    ):
        rows = []
        for row in output:
            d_i = int(torch.Size(row[0].shape[1:]).numel()) if row[0].dim() > 1 else 1
            rows.append(torch.cat([b.reshape(num_examples, d_i, -1) for b in row], dim=2))
        return torch.cat(rows, dim=1)
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], Tensor):
        raise ValueError(
            f"{method_name} returned a pair (interactions, delta); remove "
            "`return_convergence_delta` from `attribute_kwargs`"
        )
    raise TypeError(
        f"explain_dataset needs a method that returns an interaction tensor "
        f"(N, *F, *F) or a tuple of tuples of them; {method_name} returned "
        f"{type(output).__name__}"
    )


def _infer_device(method: Any, device: Union[None, str, torch.device]) -> Optional[torch.device]:
    if device is not None:
        return torch.device(device)
    forward = getattr(method, "forward_func", None)
    module = forward if isinstance(forward, torch.nn.Module) else getattr(forward, "__self__", None)
    if isinstance(module, torch.nn.Module):
        for tensor in list(module.parameters()) + list(module.buffers()):
            return tensor.device
    return None  # keep the batch where the DataLoader put it


class _Progress:
    """tqdm when installed, else a line per chunk on stderr."""

    def __init__(self, total: int, enabled: bool, description: str) -> None:
        self.enabled, self.total, self.done = enabled, total, 0
        self.start = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=description, unit="ex", file=sys.stderr)
            except ImportError:
                pass
        self.description = description

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        else:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(
                f"{self.description}: {self.done}/{self.total} examples ({rate:.1f} ex/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class DatasetExplanation:
    r"""The result of :func:`explain_dataset`.

    Global summaries in memory, per-example interactions read lazily from the
    chunk files, in dataset order.

    Attributes:
        out_dir (str): the folder of the run.
        num_examples (int): N, the examples explained.
        example_shape (tuple[int, ...]): shape of one example's interactions,
            as the method returned it, e.g. (*F, *F) or (G, G); (D, D) for
            tuple inputs (the blocks concatenated over the flattened features).
        mean_interactions (Tensor): mean of Gamma over the dataset, of shape
            ``example_shape`` (float64).
        mean_abs_interactions (Tensor): mean of abs(Gamma), same shape.
        top_pairs (list[tuple[int, int, float]]): the pairs i < j of flattened
            features (or groups) with the largest mean abs(Gamma_ij), largest first,
            as (i, j, mean abs(Gamma_ij)).
        dependence (dict[tuple[int, int], dict[str, Tensor]]): for each requested
            pair (i, j), the per-example vectors ``"x_i"``, ``"x_j"`` (feature
            values) and ``"interaction"`` (Gamma_ij), in dataset order.

    Reopen a finished run with ``DatasetExplanation.load(out_dir)``.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        with open(os.path.join(out_dir, MANIFEST_NAME)) as fh:
            self.manifest = json.load(fh)
        summary = torch.load(
            os.path.join(out_dir, SUMMARY_NAME), map_location="cpu", weights_only=True
        )
        self.num_examples: int = int(summary["num_examples"])
        self.chunk_size: int = int(self.manifest["settings"]["chunk_size"])
        self.num_chunks: int = int(self.manifest["num_chunks"])
        self.example_shape = tuple(summary["example_shape"])
        self.mean_interactions: Tensor = summary["mean"].reshape(self.example_shape)
        self.mean_abs_interactions: Tensor = summary["mean_abs"].reshape(self.example_shape)
        self.top_pairs: List[Tuple[int, int, float]] = [
            (int(i), int(j), float(v)) for i, j, v in summary["top_pairs"]
        ]
        self.dependence: Dict[Tuple[int, int], Dict[str, Tensor]] = {
            (int(i), int(j)): {
                "x_i": summary["dependence"][:, k, 0],
                "x_j": summary["dependence"][:, k, 1],
                "interaction": summary["dependence"][:, k, 2],
            }
            for k, (i, j) in enumerate(summary["dependence_pairs"])
        }
        self._cached: Tuple[int, Optional[Tensor]] = (-1, None)

    @classmethod
    def load(cls, out_dir: str) -> "DatasetExplanation":
        """Open the result of a finished run."""
        if not os.path.exists(os.path.join(out_dir, SUMMARY_NAME)):
            raise FileNotFoundError(
                f"{out_dir} holds no finished explain_dataset run ({SUMMARY_NAME} is missing)"
            )
        return cls(out_dir)

    def __len__(self) -> int:
        return self.num_examples

    def _chunk(self, chunk: int) -> Tensor:
        if self._cached[0] != chunk:
            self._cached = (chunk, _load(_chunk_path(self.out_dir, chunk))["interactions"])
        return self._cached[1]  # type: ignore[return-value]

    def __getitem__(self, index: int) -> Tensor:
        """Interactions of example ``index`` (dataset order); loads one chunk."""
        if not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        chunk, offset = divmod(index, self.chunk_size)
        return self._chunk(chunk)[offset].clone()

    def iter_chunks(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """(dataset indices, interactions) of each chunk, in dataset order."""
        for chunk in range(self.num_chunks):
            data = _load(_chunk_path(self.out_dir, chunk))
            yield data["indices"], data["interactions"]

    def __iter__(self) -> Iterator[Tensor]:
        for _, interactions in self.iter_chunks():
            yield from interactions

    def interactions(self) -> Tensor:
        """All per-example interactions in one tensor (N, ...): for small runs only."""
        return torch.cat([inter for _, inter in self.iter_chunks()])

    def __repr__(self) -> str:
        return (
            f"DatasetExplanation(out_dir={self.out_dir!r}, num_examples={self.num_examples}, "
            f"example_shape={self.example_shape}, top_pairs={self.top_pairs[:3]}...)"
        )


class _ChunkBatches:
    """Batches of dataset indices of the given chunks, generated lazily.

    Chunk c covers examples [c * chunk_size, (c + 1) * chunk_size); it is cut into
    batches of at most ``batch_size`` consecutive indices. Used as the
    ``batch_sampler`` of this rank's DataLoader.
    """

    def __init__(self, chunks: List[int], num_examples: int, chunk_size: int, batch_size: int):
        self.chunks, self.num_examples = chunks, num_examples
        self.chunk_size, self.batch_size = chunk_size, batch_size

    def bounds(self, chunk: int) -> Tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(self.num_examples, start + self.chunk_size)

    def batches_of(self, chunk: int) -> Iterator[List[int]]:
        start, stop = self.bounds(chunk)
        for b in range(start, stop, self.batch_size):
            yield list(range(b, min(stop, b + self.batch_size)))

    def __iter__(self) -> Iterator[List[int]]:
        for chunk in self.chunks:
            yield from self.batches_of(chunk)

    def __len__(self) -> int:
        sizes = (stop - start for start, stop in map(self.bounds, self.chunks))
        return sum(-(-size // self.batch_size) for size in sizes)


def _validate_loader(dataloader: Any) -> Tuple[int, int]:
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"`dataloader` must be a torch.utils.data.DataLoader, got {type(dataloader).__name__}"
        )
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            "`dataloader` must wrap a map-style dataset with __len__ (chunks are "
            "addressed by dataset index); got an iterable dataset"
        )
    if dataloader.batch_size is None:
        raise ValueError(
            "`dataloader` must use `batch_size` (a custom `batch_sampler` cannot be "
            "split into chunks by dataset index)"
        )
    if not isinstance(dataloader.sampler, SequentialSampler):
        raise ValueError(
            "`dataloader` must read the dataset in order (shuffle=False, no custom "
            "sampler): outputs are stored in dataset order and sharded across ranks "
            f"by explain_dataset itself; got sampler {type(dataloader.sampler).__name__}"
        )
    return len(dataloader.dataset), int(dataloader.batch_size)


def _rank_loader(dataloader: DataLoader, batches: _ChunkBatches) -> DataLoader:
    """The user's loader (collate, workers, pinning) over this rank's batches."""
    workers = dataloader.num_workers
    extra: Dict[str, Any] = {}
    if workers > 0:
        extra = dict(
            prefetch_factor=dataloader.prefetch_factor,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context,
        )
    return DataLoader(
        dataloader.dataset,
        batch_sampler=batches,
        collate_fn=dataloader.collate_fn,
        num_workers=workers,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        **extra,
    )


def _prepare_out_dir(
    out_dir: str, settings: Dict[str, Any], num_chunks: int, resume: bool
) -> Optional[str]:
    """Rank 0: create or check the manifest. Returns an error message or None."""
    os.makedirs(os.path.join(out_dir, CHUNK_DIR), exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    chunk_dir = os.path.join(out_dir, CHUNK_DIR)
    for name in os.listdir(chunk_dir):  # leftovers of a crash mid-write
        if ".tmp." in name:
            os.remove(os.path.join(chunk_dir, name))
    if os.path.exists(manifest_path):
        if resume:
            with open(manifest_path) as fh:
                old = json.load(fh)
            old_settings = old.get("settings", {})
            if old_settings != settings:
                keys = sorted(
                    k
                    for k in set(old_settings) | set(settings)
                    if old_settings.get(k) != settings.get(k)
                )
                return (
                    f"explain_dataset: {out_dir} holds a run with different settings "
                    f"(differing: {', '.join(keys)}); use another out_dir, the same "
                    "settings, or resume=False to start over"
                )
        else:
            for name in os.listdir(chunk_dir):
                os.remove(os.path.join(chunk_dir, name))
            for name in (SUMMARY_NAME, "summary.json"):
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
    done = sum(os.path.exists(_chunk_path(out_dir, c)) for c in range(num_chunks))
    _atomic_save(
        dict(
            version=FORMAT_VERSION,
            settings=settings,
            num_chunks=num_chunks,
            chunks_done=done,
            complete=False,
        ),
        manifest_path,
    )
    return None


def explain_dataset(
    method: Any,
    dataloader: DataLoader,
    out_dir: str,
    attribute_kwargs: Optional[Dict[str, Any]] = None,
    batch_to_inputs: Optional[Callable[[Any], Any]] = None,
    chunk_size: Optional[int] = None,
    top_k: int = 20,
    dependence_pairs: Sequence[Tuple[int, int]] = (),
    seed: int = 0,
    device: Union[None, str, torch.device] = None,
    progress: bool = True,
    resume: bool = True,
    method_function: str = "attribute",
) -> DatasetExplanation:
    r"""
    Explain every example of a dataset, streaming results to disk.

    Runs an interaction method over every batch, writes the per-example
    matrices to disk and accumulates global summaries.

    The dataset is cut into chunks of ``chunk_size`` consecutive examples.
    Each chunk is explained (batch by batch, as the DataLoader's
    ``batch_size`` says), moved to the CPU once, and written atomically to
    ``out_dir/chunks/chunk_<c>.pt`` together with its partial sums. A crash or
    Ctrl-C loses at most the chunk in flight: a rerun with ``resume=True`` skips
    the chunks on disk. ``out_dir/manifest.json`` records the settings; a rerun
    with different settings raises ``ValueError``.

    Distributed: when ``torch.distributed`` is initialized (e.g. under
    ``torchrun``, gloo on CPU, NCCL on GPU with ``torch.cuda.set_device(local_rank)``),
    rank r explains chunks r, r + W, r + 2W, ... (``DistributedSampler``
    semantics at chunk granularity, no padding), each chunk file is written by
    one rank to the shared ``out_dir``, the sums are all-reduced and rank 0
    writes the summary. Every rank must call this function with the same
    arguments; all get the same result. Results do not depend on the number of
    processes (up to float summation order), nor on resuming: random methods
    (Expected Hessians, SmoothHess) are seeded per chunk from ``seed`` and the
    chunk index.

    Memory is one chunk of per-example matrices plus O(D^2) sums and
    O(N x len(dependence_pairs)) dependence values.

    Args:
        method (Attribution): an interaction method of this library (e.g.
            :class:`~captum_interactions.IntegratedHessians`) whose ``attribute``
            returns (N, *F, *F), (N, G, G) with ``feature_mask``, or a tuple of
            tuples for tuple inputs (stored as one (N, D, D) block matrix over
            the flattened, concatenated features).
        dataloader (DataLoader): a loader over a map-style dataset, in order
            (``shuffle=False``). Its dataset, ``batch_size``, ``collate_fn``,
            ``num_workers`` and ``pin_memory`` are used; the sharding is done here.
        out_dir (str): folder for the chunk files, manifest and summary; shared
            by all ranks.
        attribute_kwargs (dict, optional): keyword arguments of the called
            method (``method.attribute`` by default) that are the same for every
            batch (``baselines``, ``n_steps``, ``feature_mask``, ``target`` as an
            int, ...). Default: None
        batch_to_inputs (Callable, optional): maps a batch to the inputs (a tensor
            or a tuple of tensors) or to a dict of per-batch ``attribute``
            arguments holding ``"inputs"``, e.g.
            ``lambda batch: {"inputs": batch[0], "target": batch[1]}`` to explain
            each example's label. Must not repeat a key of ``attribute_kwargs``.
            Default: a tensor batch is the inputs; for a list/tuple batch (e.g.
            from ``TensorDataset(x, y)``) the first element is the inputs and the
            rest is ignored.
        chunk_size (int, optional): examples per chunk file (the most a crash
            loses, and what is held in memory). Default: the loader's batch_size
        top_k (int, optional): how many pairs to keep in ``top_pairs``.
            Default: 20
        dependence_pairs (sequence of (int, int), optional): pairs (i, j) of
            flattened feature indices (row-major over (*F), concatenated over
            tuple inputs) for which x_i, x_j and Gamma_ij are kept per example for
            dependence plots. Needs per-feature output (no ``feature_mask``).
            Default: ()
        seed (int, optional): base seed; chunk c runs under
            ``torch.manual_seed(hash(seed, c))`` (global RNG state restored after).
            Default: 0
        device (str or torch.device, optional): where batches are moved.
            Default: the device of the model's parameters (batches stay where
            the loader puts them for a model without parameters)
        progress (bool, optional): show a progress bar (tqdm if installed, else
            a line per chunk) on rank 0. Default: True
        resume (bool, optional): continue a previous run in ``out_dir``
            (``False`` deletes its chunks and starts over). Default: True
        method_function (str, optional): the name of the method of ``method``
            that returns the interaction matrices, called with the inputs and
            ``attribute_kwargs``; e.g. ``"interactions"`` for
            :class:`~captum_interactions.ContextualDecomposition`, whose
            ``attribute`` returns (N, G) group scores. Default: "attribute"

    Returns:
        :class:`DatasetExplanation`: the summaries and lazy per-example access.

    Examples::

        >>> import tempfile, torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from captum_interactions import IntegratedHessians, explain_dataset
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Softplus(),
        ...                             torch.nn.Linear(8, 1))
        >>> loader = DataLoader(TensorDataset(torch.randn(50, 4)), batch_size=16)
        >>> result = explain_dataset(IntegratedHessians(model), loader,
        ...                          tempfile.mkdtemp(), attribute_kwargs={"n_steps": 8},
        ...                          dependence_pairs=[(0, 1)], progress=False)
        >>> result.mean_abs_interactions.shape, len(result), result[3].shape
        (torch.Size([4, 4]), 50, torch.Size([4, 4]))
    """
    if not isinstance(method_function, str) or not callable(getattr(method, method_function, None)):
        raise TypeError(
            f"`method` must have a callable `{method_function}` (see `method_function`), got "
            f"{type(method).__name__}"
        )
    explain = getattr(method, method_function)
    num_examples, batch_size = _validate_loader(dataloader)
    if num_examples == 0:
        raise ValueError("`dataloader` has an empty dataset")
    chunk_size = batch_size if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"`top_k` must be a non-negative int, got {top_k!r}")
    pairs = [tuple(int(v) for v in p) for p in dependence_pairs]
    if any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise ValueError(
            "`dependence_pairs` must be pairs (i, j) of non-negative feature indices, "
            f"got {dependence_pairs!r}"
        )
    attribute_kwargs = dict(attribute_kwargs or {})
    if attribute_kwargs.get("return_convergence_delta"):
        raise ValueError(
            "`attribute_kwargs` must not set return_convergence_delta: explain_dataset "
            "stores interaction matrices only"
        )
    if "inputs" in attribute_kwargs:
        raise ValueError("`attribute_kwargs` must not hold 'inputs': they come from the dataloader")
    batch_to_inputs = batch_to_inputs or default_batch_to_inputs
    method_name = f"{type(method).__name__}.{method_function}"
    out_dir = os.fspath(out_dir)

    settings = dict(
        method=type(method).__name__,
        method_function=method_function,
        model=type(getattr(method, "forward_func", None)).__name__,
        batch_to_inputs=_fingerprint(batch_to_inputs),
        num_examples=num_examples,
        batch_size=batch_size,
        chunk_size=chunk_size,
        seed=int(seed),
        top_k=top_k,
        dependence_pairs=[list(p) for p in pairs],
    )
    # one key per argument, so a mismatch names it
    settings.update(
        {f"attribute_kwargs.{k}": _fingerprint(v) for k, v in attribute_kwargs.items()}
    )
    # JSON round trip so a rerun compares like with like (tuples become lists)
    settings = json.loads(json.dumps(settings))
    num_chunks = -(-num_examples // chunk_size)
    rank, world_size = distributed_context()
    error = _prepare_out_dir(out_dir, settings, num_chunks, resume) if rank == 0 else None
    error = broadcast_from_rank0(error)
    if error is not None:
        raise ValueError(error)
    barrier()

    mine = rank_chunks(num_chunks, rank, world_size)
    todo = [c for c in mine if not os.path.exists(_chunk_path(out_dir, c))]
    batches = _ChunkBatches(todo, num_examples, chunk_size, batch_size)
    target_device = _infer_device(method, device)
    accum_device = target_device or torch.device("cpu")
    sums: Optional[Tensor] = None  # sum Gamma, sum |Gamma|: (2, D, D), float64

    def add(chunk_sum: Tensor, chunk_abs: Tensor) -> None:
        nonlocal sums
        stacked = torch.stack([chunk_sum, chunk_abs]).to(accum_device, torch.float64)
        sums = stacked if sums is None else sums + stacked

    for c in mine:  # chunks finished by an earlier run
        if c not in todo:
            data = _load(_chunk_path(out_dir, c))
            add(data["sum"], data["abs_sum"])

    bar = _Progress(
        sum(stop - start for start, stop in map(batches.bounds, todo)),
        progress and rank == 0,
        f"{type(method).__name__} rank {rank}/{world_size}" if world_size > 1
        else type(method).__name__,
    )
    cuda_devices = (
        [target_device.index if target_device.index is not None else torch.cuda.current_device()]
        if target_device is not None and target_device.type == "cuda"
        else []
    )
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            loader = iter(_rank_loader(dataloader, batches)) if todo else iter(())
            for c in todo:
                torch.manual_seed(_chunk_seed(seed, c))
                pieces, dep_pieces = [], []
                for _ in batches.batches_of(c):  # the loader yields them in this order
                    batch = next(loader)
                    per_batch = _as_kwargs(batch_to_inputs(batch))
                    clash = set(per_batch) & set(attribute_kwargs)
                    if clash:
                        raise ValueError(
                            f"`batch_to_inputs` and `attribute_kwargs` both set {sorted(clash)}"
                        )
                    if target_device is not None:
                        per_batch = _to_device(per_batch, target_device)
                    inputs = per_batch["inputs"]
                    n = (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
                    output = explain(**per_batch, **attribute_kwargs)
                    flat = _flat_matrix(output, n, method_name)
                    pieces.append(output if isinstance(output, Tensor) else flat)
                    if pairs:
                        dep_pieces.append(_dependence_values(inputs, flat, pairs))
                    bar.update(n)
                block = torch.cat(pieces).detach()
                flat_block = block.reshape(block.shape[0], -1).to(torch.float64)
                side = math.isqrt(flat_block.shape[1])
                chunk_sum = flat_block.sum(0).reshape(side, side)
                chunk_abs = flat_block.abs().sum(0).reshape(side, side)
                start = batches.bounds(c)[0]
                record = dict(
                    chunk=c,
                    indices=torch.arange(start, start + block.shape[0]),
                    interactions=block.cpu(),
                    sum=chunk_sum.cpu(),
                    abs_sum=chunk_abs.cpu(),
                    example_shape=list(block.shape[1:]),
                    dependence=(
                        torch.cat(dep_pieces).cpu()
                        if dep_pieces
                        else torch.zeros(block.shape[0], 0, 3)
                    ),
                )
                _atomic_save(record, _chunk_path(out_dir, c))
                add(chunk_sum, chunk_abs)
    finally:
        bar.close()

    # reduce across ranks; a rank without chunks contributes zeros of the right size
    side = 0 if sums is None else sums.shape[-1]
    side = int(all_reduce_max(torch.tensor([float(side)], dtype=torch.float64)).item())
    if sums is None:
        sums = torch.zeros(2, side, side, dtype=torch.float64, device=accum_device)
    sums = all_reduce_sum(sums)
    barrier()
    if rank == 0:
        _write_summary(out_dir, sums, num_examples, num_chunks, pairs, top_k, settings)
    barrier()
    return DatasetExplanation(out_dir)


def _dependence_values(inputs: Any, flat: Tensor, pairs: List[Tuple[int, ...]]) -> Tensor:
    """(n, P, 3): x_i, x_j, Gamma_ij per example for each pair."""
    features = flatten_features(inputs if isinstance(inputs, tuple) else (inputs,)).detach()
    d = flat.shape[1]
    if features.shape[1] != d:
        raise ValueError(
            f"`dependence_pairs` need one output row per input feature; the method "
            f"returned {d} rows for {features.shape[1]} features (drop feature_mask, "
            "or dependence_pairs)"
        )
    if max(max(p) for p in pairs) >= d:
        raise ValueError(f"`dependence_pairs` index out of range for {d} features: {pairs}")
    i = torch.tensor([p[0] for p in pairs], device=flat.device)
    j = torch.tensor([p[1] for p in pairs], device=flat.device)
    gamma = flat.detach()[:, i, j]
    return torch.stack(
        [features[:, i].to(gamma.dtype), features[:, j].to(gamma.dtype), gamma], dim=2
    )


def _write_summary(
    out_dir: str,
    sums: Tensor,
    num_examples: int,
    num_chunks: int,
    pairs: List[Tuple[int, ...]],
    top_k: int,
    settings: Dict[str, Any],
) -> None:
    sums = sums.cpu()
    mean, mean_abs = sums[0] / num_examples, sums[1] / num_examples
    side = mean.shape[0]
    upper_i, upper_j = torch.triu_indices(side, side, offset=1)
    scores = mean_abs[upper_i, upper_j]
    k = min(top_k, scores.numel())
    values, order = torch.topk(scores, k) if k else (scores[:0], scores[:0].long())
    top = [(int(upper_i[o]), int(upper_j[o]), float(v)) for o, v in zip(order, values)]
    shape: List[int] = []
    dependence = []
    for c in range(num_chunks):  # small per-chunk vectors, read in dataset order
        data = _load(_chunk_path(out_dir, c))
        shape = list(data["example_shape"])
        dependence.append(data["dependence"].clone())
    summary = dict(
        num_examples=num_examples,
        example_shape=shape,
        mean=mean,
        mean_abs=mean_abs,
        top_pairs=top,
        dependence_pairs=[list(p) for p in pairs],
        dependence=torch.cat(dependence) if pairs else torch.zeros(num_examples, 0, 3),
    )
    _atomic_save(summary, os.path.join(out_dir, SUMMARY_NAME))
    _atomic_save(
        dict(
            num_examples=num_examples,
            example_shape=shape,
            top_pairs=[dict(i=i, j=j, mean_abs=v) for i, j, v in top],
            settings=settings,
        ),
        os.path.join(out_dir, "summary.json"),
    )
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    manifest.update(chunks_done=num_chunks, complete=True)
    _atomic_save(manifest, manifest_path)


__all__ = ["DatasetExplanation", "explain_dataset", "default_batch_to_inputs"]
