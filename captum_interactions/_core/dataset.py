#!/usr/bin/env python3
r"""Explain a whole dataset: chunked, resumable, distributed, verified, with global summaries.

:func:`explain_dataset` runs an interaction method of this library over a
``DataLoader`` and streams per-example matrices to disk in chunk files, then
builds the global summaries (mean Gamma, mean abs(Gamma), top pairs,
dependence-plot data) from the chunk files without holding every matrix in
memory. Under ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU)
every rank explains its own chunks.

What is on disk is checked, never trusted blindly: the run is fingerprinted
(model parameters and buffers, method and settings, and each chunk's inputs),
every file carries checksums, and a lock guards the folder. The storage (file
layout, safetensors + JSON, fingerprints, checksums, lock) lives in
:mod:`captum_interactions._utils.dataset_storage`.
"""
import hashlib
import inspect
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from captum_interactions._utils.dataset_storage import (
    CHUNK_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SUMMARY_JSON_NAME,
    SUMMARY_TENSORS_NAME,
    DatasetStorageError,
    InputsHasher,
    OutDirLock,
    chunk_path,
    describe_differences,
    json_sha256,
    method_fingerprint,
    model_fingerprint,
    old_format_files,
    old_format_message,
    quarantine,
    read_chunk,
    read_json,
    read_tensors,
    remove_run_files,
    remove_temporaries,
    value_fingerprint,
    write_json,
    write_tensors,
)
from captum_interactions._utils.distributed import (
    all_reduce_max,
    barrier,
    broadcast_from_rank0,
    distributed_context,
    rank_chunks,
)
from captum_interactions._utils.common import NonFiniteResultWarning
from captum_interactions._utils.feature_groups import flatten_features

# how many non-finite example indices the warning and summary.json list
_SHOWN_NONFINITE = 20


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


def _bounds(chunk: int, chunk_size: int, num_examples: int) -> Tuple[int, int]:
    start = chunk * chunk_size
    return start, min(num_examples, start + chunk_size)


class DatasetExplanation:
    r"""The result of :func:`explain_dataset`.

    Global summaries in memory, per-example interactions read lazily from the
    chunk files, in dataset order.

    Every read is checked: each chunk file must belong to this run, hold the
    chunk and examples expected, and match its checksums; a file that does not
    raises :class:`DatasetStorageError` naming it (rerun :func:`explain_dataset`
    with the same arguments to recompute it). Results are never partial.

    Attributes:
        out_dir (str): the folder of the run.
        num_examples (int): N, the examples explained.
        example_shape (tuple[int, ...]): shape of one example's interactions,
            as the method returned it, e.g. (*F, *F) or (G, G); (D, D) for
            tuple inputs (the blocks concatenated over the flattened features).
        mean_interactions (Tensor): mean of Gamma over the examples whose
            interactions are all finite, of shape ``example_shape`` (float64).
        mean_abs_interactions (Tensor): mean of abs(Gamma) over the same
            examples, same shape.
        top_pairs (list[tuple[int, int, float]]): the pairs i < j of flattened
            features (or groups) with the largest mean abs(Gamma_ij), largest first,
            as (i, j, mean abs(Gamma_ij)).
        dependence (dict[tuple[int, int], dict[str, Tensor]]): for each requested
            pair (i, j), the per-example vectors ``"index"`` (dataset indices),
            ``"x_i"``, ``"x_j"`` (feature values) and ``"interaction"``
            (Gamma_ij), in dataset order, over the finite examples.
        num_finite (int): examples whose interactions are all finite (those the
            summaries average).
        nonfinite_examples (list[int]): dataset indices of the examples with a
            NaN or infinite interaction, left out of the summaries (their
            per-example results keep the values).
        run_digest (str): SHA-256 of the run's fingerprint.

    Reopen a finished run with ``DatasetExplanation.load(out_dir)``.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir = os.fspath(out_dir)
        old = old_format_files(out_dir)
        if old:
            raise DatasetStorageError(out_dir, old_format_message(out_dir, old))
        manifest_path = os.path.join(out_dir, MANIFEST_NAME)
        self.manifest = read_json(manifest_path, "manifest")
        if self.manifest.get("format") != FORMAT:
            raise DatasetStorageError(manifest_path, f"{manifest_path} is not an "
                                      "explain_dataset manifest")
        if not self.manifest.get("complete"):
            raise DatasetStorageError(
                manifest_path, f"{out_dir} holds an unfinished run ({manifest_path} says "
                "complete: false); rerun explain_dataset with the same arguments to finish it"
            )
        self.run_digest: str = self.manifest["run_digest"]
        self.num_examples: int = int(self.manifest["num_examples"])
        self.chunk_size: int = int(self.manifest["chunk_size"])
        self.num_chunks: int = int(self.manifest["num_chunks"])
        if self.num_chunks != -(-self.num_examples // self.chunk_size):
            raise DatasetStorageError(
                manifest_path, f"{manifest_path} is inconsistent: num_chunks "
                f"{self.num_chunks} for {self.num_examples} examples in chunks of "
                f"{self.chunk_size}"
            )
        summary_path = os.path.join(out_dir, SUMMARY_JSON_NAME)
        summary = read_json(summary_path, "summary")
        tensor_path = os.path.join(out_dir, SUMMARY_TENSORS_NAME)
        tensors, meta = read_tensors(tensor_path, "summary")
        for path, digest, count in ((summary_path, summary.get("run_digest"),
                                     summary.get("num_examples")),
                                    (tensor_path, meta.get("run_digest"), self.num_examples)):
            if digest != self.run_digest or count != self.num_examples:
                raise DatasetStorageError(path, f"{path} belongs to another run than "
                                          f"{manifest_path}; rerun explain_dataset")
        self.example_shape = tuple(summary["example_shape"])
        self.mean_interactions: Tensor = tensors["mean"].reshape(self.example_shape)
        self.mean_abs_interactions: Tensor = tensors["mean_abs"].reshape(self.example_shape)
        self.top_pairs: List[Tuple[int, int, float]] = [
            (int(i), int(j), float(v)) for i, j, v in summary["top_pairs"]
        ]
        self.num_finite: int = int(summary["num_finite"])
        self.nonfinite_examples: List[int] = tensors["nonfinite_indices"].tolist()
        finite = tensors["finite"]
        index = torch.arange(self.num_examples, device="cpu")[finite]
        dependence = tensors["dependence"][finite]
        self.dependence: Dict[Tuple[int, int], Dict[str, Tensor]] = {
            (int(i), int(j)): {
                "index": index,
                "x_i": dependence[:, k, 0],
                "x_j": dependence[:, k, 1],
                "interaction": dependence[:, k, 2],
            }
            for k, (i, j) in enumerate(summary["dependence_pairs"])
        }
        self._cached: Tuple[int, Optional[Tensor]] = (-1, None)

    @classmethod
    def load(cls, out_dir: str) -> "DatasetExplanation":
        """Open the result of a finished run (checking its manifest and summary)."""
        out_dir = os.fspath(out_dir)
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"{out_dir} is not a folder of an explain_dataset run")
        return cls(out_dir)

    def __len__(self) -> int:
        return self.num_examples

    def _read(self, chunk: int) -> Dict[str, Tensor]:
        # every tensor of the file is checked, not only those returned
        start, stop = _bounds(chunk, self.chunk_size, self.num_examples)
        try:
            tensors, _ = read_chunk(self.out_dir, chunk, start, stop, self.run_digest)
        except DatasetStorageError as err:
            raise DatasetStorageError(
                err.path, f"{err} -- rerun explain_dataset with the same arguments on "
                f"{self.out_dir} to recompute the damaged chunks (the sound ones are kept)"
            ) from None
        return tensors

    def _chunk(self, chunk: int) -> Tensor:
        if self._cached[0] != chunk:
            self._cached = (chunk, self._read(chunk)["interactions"])
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
            data = self._read(chunk)
            yield data["indices"], data["interactions"]

    def __iter__(self) -> Iterator[Tensor]:
        for _, interactions in self.iter_chunks():
            yield from interactions

    def interactions(self) -> Tensor:
        """All per-example interactions in one tensor (N, ...): for small runs only."""
        out = torch.cat([inter for _, inter in self.iter_chunks()])
        if out.shape[0] != self.num_examples:  # guarded by the checks above; never partial
            raise DatasetStorageError(self.out_dir, f"{self.out_dir}: the chunks hold "
                                      f"{out.shape[0]} examples, not {self.num_examples}")
        return out

    def verify(self) -> None:
        """Read and check every chunk file (all tensors).

        Raises :class:`DatasetStorageError` listing every damaged file."""
        problems = []
        for chunk in range(self.num_chunks):
            try:
                self._read(chunk)
            except DatasetStorageError as err:
                problems.append(err)
        if problems:
            raise DatasetStorageError(
                problems[0].path,
                f"{len(problems)} damaged chunk file(s) in {self.out_dir}: "
                + "; ".join(str(p).split(" -- ")[0] for p in problems)
                + " -- rerun explain_dataset with the same arguments to recompute them",
            )

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
    out_dir: str,
    fingerprint: Dict[str, Any],
    run_digest: str,
    num_examples: int,
    chunk_size: int,
    num_chunks: int,
    resume: bool,
) -> None:
    """Rank 0, with the lock held: check the previous run (or remove it when
    ``resume`` is False) and write this run's manifest."""
    remove_temporaries(out_dir)
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if not resume:
        remove_run_files(out_dir)
    else:
        old = old_format_files(out_dir)
        if old:
            raise DatasetStorageError(out_dir, old_format_message(out_dir, old))
        chunk_dir = os.path.join(out_dir, CHUNK_DIR)
        if not os.path.exists(manifest_path) and os.path.isdir(chunk_dir) and os.listdir(chunk_dir):
            warnings.warn(
                f"explain_dataset: manifest {manifest_path} is missing but {chunk_dir} holds "
                "files; each chunk file is kept only where its own metadata shows it belongs "
                "to this run, and recomputed otherwise",
                RuntimeWarning,
            )
        if os.path.exists(manifest_path):
            try:
                previous = read_json(manifest_path, "manifest")
                if previous.get("format") != FORMAT:
                    raise DatasetStorageError(
                        manifest_path, f"manifest {manifest_path} is not an explain_dataset "
                        "manifest"
                    )
            except DatasetStorageError as err:
                warnings.warn(
                    f"explain_dataset: {err}. It is rewritten from this run's settings; "
                    "each chunk file is kept only where its own metadata shows it belongs "
                    "to this run, and recomputed otherwise",
                    RuntimeWarning,
                )
            else:
                if previous.get("run_digest") != run_digest:
                    stored = previous.get("fingerprint")
                    changes = describe_differences(
                        stored if isinstance(stored, dict) else {}, fingerprint
                    )
                    raise ValueError(
                        f"explain_dataset: {out_dir} holds results of a different run; "
                        "refusing to mix them with this one: "
                        + "; ".join(changes or ["the run digest differs"])
                        + ". Use another out_dir, the same model, method and settings, or "
                        "resume=False to start over"
                    )
                layout = dict(num_examples=num_examples, chunk_size=chunk_size,
                              num_chunks=num_chunks)
                wrong = {k: previous.get(k) for k, v in layout.items() if previous.get(k) != v}
                if wrong:
                    warnings.warn(
                        f"explain_dataset: manifest {manifest_path} was edited or damaged "
                        f"({', '.join(f'{k} {v}' for k, v in wrong.items())}, expected "
                        f"{', '.join(f'{k} {layout[k]}' for k in wrong)}); it is rewritten",
                        RuntimeWarning,
                    )
    os.makedirs(os.path.join(out_dir, CHUNK_DIR), exist_ok=True)
    write_json(
        manifest_path,
        dict(format=FORMAT, version=FORMAT_VERSION, run_digest=run_digest,
             fingerprint=fingerprint, num_examples=num_examples, chunk_size=chunk_size,
             num_chunks=num_chunks, complete=False),
    )


def _run_on_rank0(world_size: int, rank: int, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0; an exception there is raised on every rank
    (as itself on rank 0, as its message elsewhere), so no rank waits forever."""
    caught: Optional[BaseException] = None
    result = None
    if rank == 0:
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            caught = err
    if world_size > 1:
        message = broadcast_from_rank0(
            None if caught is None else (type(caught).__name__, str(caught))
        )
        if message is not None and caught is None:
            kind = TimeoutError if message[0] == "TimeoutError" else ValueError
            raise kind(f"rank 0: {message[1]}")
    if caught is not None:
        raise caught
    return result


def _raise_on_every_rank(message: Optional[str], world_size: int) -> None:
    """Raise ``message`` where it was found, and a pointer to it on the other ranks."""
    if world_size > 1:
        flag = torch.tensor([0.0 if message is None else 1.0], dtype=torch.float64, device="cpu")
        if all_reduce_max(flag).item() > 0 and message is None:
            raise ValueError("explain_dataset: another rank refused to go on (see its error)")
    if message is not None:
        raise ValueError(message)


def keyword_defaults(function: Callable, given: Dict[str, Any]) -> Dict[str, Any]:
    """Default values of ``function``'s parameters that ``given`` does not set
    (``inputs`` excluded: it comes from the data)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: p.default
        for name, p in parameters.items()
        if p.kind in kinds and p.default is not p.empty and name not in given
        and name != "inputs"
    }


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
    lock_timeout: Optional[float] = 0.0,
) -> DatasetExplanation:
    r"""
    Explain every example of a dataset, streaming results to disk.

    Runs an interaction method over every batch, writes the per-example
    matrices to disk and accumulates global summaries.

    The dataset is cut into chunks of ``chunk_size`` consecutive examples.
    Each chunk is explained (batch by batch, as the DataLoader's
    ``batch_size`` says), moved to the CPU once, and written atomically to
    ``out_dir/chunks/chunk_<c>.safetensors`` (safetensors: reading it cannot
    execute code, and any safetensors reader opens it) with its dataset
    indices, partial sums, the SHA-256 of its inputs and of every tensor. A
    kill or Ctrl-C loses at most the chunk in flight: a rerun with
    ``resume=True`` keeps the chunks on disk and explains the rest.

    Nothing on disk is trusted blindly:

    - *Fingerprint.* ``out_dir/manifest.json`` records what determines the
      results: the model's parameters and buffers (a SHA-256 of each, on the
      CPU), the method's class and settings, ``method_function``,
      ``attribute_kwargs`` (tensors by content) and the layout. A rerun with any
      of them changed raises ``ValueError`` naming what changed (e.g. "model
      parameters differ (layer '0.weight')"), and so does a rerun whose data
      differ from the inputs a kept chunk was computed from ("inputs of chunk
      3 (examples 48-63) differ").
    - *Checks.* Each chunk file must belong to this run, hold the chunk and
      examples expected, and match its checksums. On resume a file that does
      not (swapped, from another run, bit-flipped, truncated, empty) is
      reported in a ``RuntimeWarning`` naming it, moved to
      ``<file>.damaged`` and recomputed; a damaged manifest is reported and
      rewritten. Reading a result (:class:`DatasetExplanation`) raises
      :class:`DatasetStorageError` naming a damaged file, and never returns a
      partial result. A folder of the old format (torch pickles) is detected and
      never read: recompute it with ``resume=False``.
    - *Non-finite examples.* Summaries skip examples with a NaN or infinite
      interaction, count them and warn naming them
      (``result.nonfinite_examples``); per-example results keep the values.
    - *Lock.* The run holds an exclusive lock on ``out_dir`` (the ``filelock``
      package; released by the OS if the process dies). A second run on the
      same folder waits up to ``lock_timeout`` seconds, then raises
      ``TimeoutError`` without touching any file, also with ``resume=False``.
      (``flock`` locks may not hold across machines on some network file
      systems.)

    Distributed: when ``torch.distributed`` is initialized (e.g. under
    ``torchrun``, gloo on CPU, NCCL on GPU with ``torch.cuda.set_device(local_rank)``),
    rank r explains chunks r, r + W, r + 2W, ... (``DistributedSampler``
    semantics at chunk granularity, no padding), each chunk file is written by
    one rank to the shared ``out_dir``, rank 0 holds the lock and writes the
    summary from the chunk files. Every rank must call this function with the same
    arguments; all get the same result. Results do not depend on the number of
    processes nor on resuming (the summaries are summed in chunk order): random methods
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
            (``False`` deletes its files and starts over, once it holds the
            lock). Default: True
        method_function (str, optional): the name of the method of ``method``
            that returns the interaction matrices, called with the inputs and
            ``attribute_kwargs``; e.g. ``"interactions"`` for
            :class:`~captum_interactions.ContextualDecomposition`, whose
            ``attribute`` returns (N, G) group scores. Default: "attribute"
        lock_timeout (float or None, optional): seconds to wait for another
            run on ``out_dir`` to finish; ``None`` waits indefinitely. Default: 0
            (fail at once with ``TimeoutError``)

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
    if lock_timeout is not None and (
        isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float))
        or not lock_timeout >= 0
    ):
        raise ValueError(
            f"`lock_timeout` must be a number of seconds >= 0 or None, got {lock_timeout!r}"
        )
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

    # the fingerprint: one key per thing that determines the results, so a
    # mismatch on resume names it
    fingerprint: Dict[str, Any] = method_fingerprint(method, method_function)
    model = model_fingerprint(getattr(method, "forward_func", None))
    if not model:
        warnings.warn(
            f"explain_dataset found no parameters or buffers in {type(method).__name__}'s "
            "forward_func (neither an nn.Module, a bound method of one, nor a closure over "
            "one), so a resume cannot detect changed weights; pass the model (an "
            "nn.Module) as forward_func to have them checked",
            RuntimeWarning,
        )
    fingerprint.update({f"model {key}": digest for key, digest in model.items()})
    fingerprint.update(
        {f"attribute_kwargs.{k}": value_fingerprint(v) for k, v in attribute_kwargs.items()}
    )
    # the defaults of what is not passed: a library version whose defaults
    # differ (e.g. the quadrature rule) must not resume the run silently
    fingerprint.update(
        {
            f"default {k}": value_fingerprint(v)
            for k, v in keyword_defaults(
                # the class's function: an instance-level wrapper may hide the signature
                getattr(type(method), method_function, getattr(method, method_function)),
                attribute_kwargs,
            ).items()
        }
    )
    fingerprint.update(
        batch_to_inputs=value_fingerprint(batch_to_inputs),
        num_examples=num_examples,
        batch_size=batch_size,
        chunk_size=chunk_size,
        seed=int(seed),
        top_k=top_k,
        dependence_pairs=[list(p) for p in pairs],
    )
    # JSON round trip so a rerun compares like with like (tuples become lists)
    fingerprint = json.loads(json.dumps(fingerprint))
    run_digest = json_sha256(fingerprint)
    num_chunks = -(-num_examples // chunk_size)
    rank, world_size = distributed_context()
    root_digest = broadcast_from_rank0(run_digest)
    _raise_on_every_rank(
        None if root_digest == run_digest else
        f"explain_dataset: rank {rank}'s model, method or settings differ from rank 0's "
        "(every rank must explain the same model with the same arguments)",
        world_size,
    )

    lock: Optional[OutDirLock] = None

    def take_lock_and_prepare() -> None:
        nonlocal lock
        os.makedirs(out_dir, exist_ok=True)
        lock = OutDirLock(out_dir, lock_timeout)
        lock.acquire()
        try:
            _prepare_out_dir(out_dir, fingerprint, run_digest, num_examples, chunk_size,
                             num_chunks, resume)
        except BaseException:
            lock.release()
            lock = None
            raise

    _run_on_rank0(world_size, rank, take_lock_and_prepare)
    try:
        barrier()
        _explain_chunks(
            explain, method, method_name, dataloader, out_dir, attribute_kwargs,
            batch_to_inputs, num_examples, batch_size, chunk_size, num_chunks, pairs, seed,
            device, progress, run_digest, rank, world_size,
        )
        barrier()
        _run_on_rank0(world_size, rank, lambda: _write_summary(
            out_dir, run_digest, num_examples, chunk_size, num_chunks, pairs, top_k,
            fingerprint,
        ))
        result = DatasetExplanation(out_dir)
        barrier()  # every rank has read the summary before the lock is released
    finally:
        if lock is not None:
            lock.release()
    if rank == 0 and result.nonfinite_examples:
        shown = result.nonfinite_examples[:_SHOWN_NONFINITE]
        more = "" if len(result.nonfinite_examples) <= len(shown) else ", ..."
        warnings.warn(
            f"explain_dataset: {len(result.nonfinite_examples)} of {num_examples} examples "
            f"have non-finite (NaN or infinite) interactions (examples "
            f"{', '.join(map(str, shown))}{more}); mean_interactions, "
            "mean_abs_interactions, top_pairs and dependence skip them (result.num_finite = "
            f"{result.num_finite}); their per-example results keep the values. The list is "
            "result.nonfinite_examples",
            RuntimeWarning,
        )
    return result


def _explain_chunks(
    explain: Callable[..., Any],
    method: Any,
    method_name: str,
    dataloader: DataLoader,
    out_dir: str,
    attribute_kwargs: Dict[str, Any],
    batch_to_inputs: Callable[[Any], Any],
    num_examples: int,
    batch_size: int,
    chunk_size: int,
    num_chunks: int,
    pairs: List[Tuple[int, ...]],
    seed: int,
    device: Union[None, str, torch.device],
    progress: bool,
    run_digest: str,
    rank: int,
    world_size: int,
) -> None:
    """This rank's part: check the chunks on disk, then explain the others."""
    mine = rank_chunks(num_chunks, rank, world_size)
    done: Dict[int, str] = {}  # chunk -> the SHA-256 of its inputs, as stored
    todo: List[int] = []
    for c in mine:
        path = chunk_path(out_dir, c)
        if not os.path.exists(path):
            todo.append(c)
            continue
        start, stop = _bounds(c, chunk_size, num_examples)
        try:
            _, meta = read_chunk(out_dir, c, start, stop, run_digest)
        except DatasetStorageError as err:
            moved = quarantine(path)
            warnings.warn(f"explain_dataset: {err}; moved it to {moved} and recomputing "
                          f"chunk {c}", RuntimeWarning)
            todo.append(c)
            continue
        done[c] = meta.get("inputs_sha256", "")

    def per_batch_of(batch: Any) -> Dict[str, Any]:
        per_batch = _as_kwargs(batch_to_inputs(batch))
        clash = set(per_batch) & set(attribute_kwargs)
        if clash:
            raise ValueError(
                f"`batch_to_inputs` and `attribute_kwargs` both set {sorted(clash)}"
            )
        return per_batch

    # the data of the chunks kept must be the data they were computed from
    mismatch = None
    if done:
        kept = _ChunkBatches(sorted(done), num_examples, chunk_size, batch_size)
        loader = iter(_rank_loader(dataloader, kept))
        for c in sorted(done):
            hasher = InputsHasher()
            for _ in kept.batches_of(c):
                hasher.update(per_batch_of(next(loader)))
            if hasher.hexdigest() != done[c]:
                start, stop = _bounds(c, chunk_size, num_examples)
                mismatch = (
                    f"explain_dataset: the inputs of chunk {c} (examples {start}–{stop - 1}) "
                    f"differ from those its stored results {chunk_path(out_dir, c)} were "
                    "computed from; refusing to mix results of different data. Use another "
                    "out_dir, the data of the first run, or resume=False to start over"
                )
                break
        del loader
    _raise_on_every_rank(mismatch, world_size)

    batches = _ChunkBatches(todo, num_examples, chunk_size, batch_size)
    target_device = _infer_device(method, device)
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
                hasher = InputsHasher()
                for _ in batches.batches_of(c):  # the loader yields them in this order
                    per_batch = per_batch_of(next(loader))
                    hasher.update(per_batch)
                    if target_device is not None:
                        per_batch = _to_device(per_batch, target_device)
                    inputs = per_batch["inputs"]
                    n = (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
                    with warnings.catch_warnings():
                        # the run names its non-finite examples once, by dataset index
                        warnings.simplefilter("ignore", NonFiniteResultWarning)
                        output = explain(**per_batch, **attribute_kwargs)
                    flat = _flat_matrix(output, n, method_name)
                    pieces.append(output if isinstance(output, Tensor) else flat)
                    if pairs:
                        dep_pieces.append(_dependence_values(inputs, flat, pairs))
                    bar.update(n)
                _write_chunk(out_dir, c, batches.bounds(c), pieces, dep_pieces,
                             hasher.hexdigest(), run_digest)
    finally:
        bar.close()


def _write_chunk(
    out_dir: str,
    chunk: int,
    bounds: Tuple[int, int],
    pieces: List[Tensor],
    dep_pieces: List[Tensor],
    inputs_sha256: str,
    run_digest: str,
) -> None:
    block = torch.cat(pieces).detach()
    n = block.shape[0]
    flat_block = block.reshape(n, -1).to(torch.float64)
    side = math.isqrt(flat_block.shape[1])
    # summaries skip examples with a NaN or infinite entry; the matrices keep them
    finite = flat_block.isfinite().all(dim=1)
    kept = flat_block if bool(finite.all()) else flat_block[finite]
    start, stop = bounds
    write_tensors(
        chunk_path(out_dir, chunk),
        dict(
            indices=torch.arange(start, stop, device="cpu"),
            interactions=block,
            finite=finite,
            sum=kept.sum(0).reshape(side, side),
            abs_sum=kept.abs().sum(0).reshape(side, side),
            dependence=(
                torch.cat(dep_pieces) if dep_pieces
                else torch.zeros(n, 0, 3, dtype=torch.float64, device="cpu")
            ),
        ),
        dict(run_digest=run_digest, chunk=str(chunk), start=str(start), stop=str(stop),
             inputs_sha256=inputs_sha256, example_shape=json.dumps(list(block.shape[1:]))),
    )


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
    run_digest: str,
    num_examples: int,
    chunk_size: int,
    num_chunks: int,
    pairs: List[Tuple[int, ...]],
    top_k: int,
    fingerprint: Dict[str, Any],
) -> None:
    """Rank 0: the summaries from the chunk files (checked), summed in chunk
    order, so they do not depend on the number of processes or on resuming."""
    sums: Optional[Tensor] = None
    shape: List[int] = []
    finite, dependence = [], []
    for c in range(num_chunks):
        start, stop = _bounds(c, chunk_size, num_examples)
        try:
            tensors, meta = read_chunk(out_dir, c, start, stop, run_digest,
                                       ("sum", "abs_sum", "finite", "dependence"))
        except DatasetStorageError as err:
            raise DatasetStorageError(
                err.path, f"explain_dataset: {err} (changed while the run was going?); "
                "rerun explain_dataset with the same arguments to recompute it"
            ) from None
        shape = json.loads(meta["example_shape"])
        stacked = torch.stack([tensors["sum"], tensors["abs_sum"]])
        sums = stacked if sums is None else sums + stacked
        finite.append(tensors["finite"])
        dependence.append(tensors["dependence"])
    assert sums is not None
    finite_mask = torch.cat(finite)
    num_finite = int(finite_mask.sum())
    nonfinite = (~finite_mask).nonzero().flatten()
    if num_finite:
        mean, mean_abs = sums[0] / num_finite, sums[1] / num_finite
    else:  # nothing to average: say so with NaN (and the warning), never zeros
        mean = mean_abs = torch.full_like(sums[0], float("nan"))
    side = mean.shape[0]
    upper_i, upper_j = torch.triu_indices(side, side, offset=1, device="cpu")
    scores = mean_abs[upper_i, upper_j]
    k = min(top_k, scores.numel()) if num_finite else 0
    values, order = torch.topk(scores, k) if k else (scores[:0], scores[:0].long())
    top = [(int(upper_i[o]), int(upper_j[o]), float(v)) for o, v in zip(order, values)]
    write_tensors(
        os.path.join(out_dir, SUMMARY_TENSORS_NAME),
        dict(mean=mean, mean_abs=mean_abs, finite=finite_mask, nonfinite_indices=nonfinite,
             dependence=torch.cat(dependence)),
        dict(run_digest=run_digest, num_examples=str(num_examples)),
    )
    write_json(
        os.path.join(out_dir, SUMMARY_JSON_NAME),
        dict(
            format=FORMAT,
            version=FORMAT_VERSION,
            run_digest=run_digest,
            num_examples=num_examples,
            num_finite=num_finite,
            nonfinite_examples_first=nonfinite[:_SHOWN_NONFINITE].tolist(),
            example_shape=shape,
            top_pairs=[[i, j, v] for i, j, v in top],
            dependence_pairs=[list(p) for p in pairs],
            fingerprint=fingerprint,
        ),
    )
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    manifest = read_json(manifest_path, "manifest")
    manifest.update(complete=True)
    write_json(manifest_path, manifest)


__all__ = [
    "DatasetExplanation",
    "DatasetStorageError",
    "explain_dataset",
    "default_batch_to_inputs",
]
