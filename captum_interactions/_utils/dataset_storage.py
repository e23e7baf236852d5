#!/usr/bin/env python3
r"""On-disk storage of :func:`~captum_interactions.explain_dataset` runs.

What is on disk is never trusted blindly: every file says which run it belongs
to and carries checksums of its content, and reading it checks them.

Layout of ``out_dir``::

    manifest.json                     the run's fingerprint, layout and progress
    chunks/chunk_000000.safetensors   one chunk: tensors + metadata (see below)
    summary.safetensors               global summaries (tensors)
    summary.json                      global summaries (top pairs, counts, settings)
    .lock, .lock.owner.json           the lock of a live run, and who holds it

A chunk file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file
(a JSON header, then raw little-endian tensor bytes: reading one cannot execute
code, and any safetensors reader opens it, in Python, Rust or JavaScript) with
the tensors ``indices`` (dataset indices), ``interactions`` (the per-example
matrices), ``finite`` (per example: every entry finite), ``sum`` and
``abs_sum`` (float64 sums of Gamma and abs(Gamma) over the finite examples)
and ``dependence`` (x_i, x_j, Gamma_ij per example and requested pair). Its
string metadata holds the run's digest, the chunk number and its example range
``[start, stop)``, the SHA-256 of the chunk's inputs (as ``batch_to_inputs``
returned them) and the SHA-256 of every tensor's bytes.

The JSON files carry a ``"sha256"`` of their own canonical content, so an edit
(e.g. of ``num_chunks``) is detected.

The run's *fingerprint* is what determines the results: the model's parameters
and buffers (SHA-256 of each tensor's bytes, on the CPU, so it does not depend
on the device), the method's class, the called function and the method's
settings (its data attributes, e.g. ``multiply_by_inputs``), the
``attribute_kwargs`` (tensors by content) and the layout (dataset length, batch
and chunk size, seed, summaries asked for). Its SHA-256 is the run digest.
"""
import hashlib
import json
import os
import re
import socket
import time
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

FORMAT = "captum_interactions.explain_dataset"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SUMMARY_TENSORS_NAME = "summary.safetensors"
SUMMARY_JSON_NAME = "summary.json"
CHUNK_DIR = "chunks"
CHUNK_SUFFIX = ".safetensors"
LOCK_NAME = ".lock"
LOCK_OWNER_NAME = ".lock.owner.json"
DAMAGED_SUFFIX = ".damaged"
# files of the format-1 layout (torch pickles); detected, never read
OLD_SUMMARY_NAME = "summary.pt"
OLD_CHUNK_SUFFIX = ".pt"

# benchmarks/bench_dataset_faults.py switches hashing off to measure its cost
_HASHING = True


class DatasetStorageError(ValueError):
    """A file of an explain_dataset run is missing, damaged, foreign or old.

    A ``ValueError``; ``path`` is the file (or folder) at fault. A rerun of
    :func:`~captum_interactions.explain_dataset` with the same arguments
    recomputes what is damaged and keeps what is sound."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


# ---------------------------------------------------------------- hashing
def _tensor_bytes(tensor: Tensor) -> memoryview:
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1)
    if data.numel() == 0:
        return memoryview(b"")
    return memoryview(data.view(torch.uint8).numpy())


def hash_value_into(digest: Any, value: Any) -> None:
    """Feed ``value`` into a hashlib object: tensors by dtype, shape and bytes,
    containers element by element, other values by ``repr``."""
    if isinstance(value, Tensor):
        digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
        if _HASHING:
            digest.update(_tensor_bytes(value))
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}(".encode())
        for item in value:
            hash_value_into(digest, item)
        digest.update(b")")
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}(".encode())
        for key in sorted(value, key=str):
            digest.update(f"{key!s}=".encode())
            hash_value_into(digest, value[key])
        digest.update(b")")
    else:
        digest.update(f"V{_stable_repr(value)};".encode())


def tensor_sha256(tensor: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (device-independent)."""
    digest = hashlib.sha256()
    hash_value_into(digest, tensor)
    return digest.hexdigest()


def _stable_repr(value: Any) -> str:
    # drop memory addresses, which differ between runs of the same program
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(_canonical_json(obj)).hexdigest()


# ---------------------------------------------------------------- fingerprints
def value_fingerprint(value: Any, module_names: Optional[Dict[int, str]] = None) -> Any:
    """A JSON-able description of a setting; tensors by shape, dtype and SHA-256,
    modules by their name in the model, functions by qualified name."""
    if isinstance(value, Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype),
                "sha256": tensor_sha256(value)}
    if isinstance(value, torch.nn.Module):
        name = (module_names or {}).get(id(value))
        if name is not None:
            return f"module '{name or '<model>'}' ({type(value).__name__})"
        return f"module {type(value).__name__} {module_fingerprint_digest(value)}"
    if isinstance(value, (list, tuple)):
        return [value_fingerprint(v, module_names) for v in value]
    if isinstance(value, dict):
        return {str(k): value_fingerprint(value[k], module_names) for k in sorted(value, key=str)}
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__name__)
        return f"callable:{getattr(value, '__module__', '')}.{name}"
    return _stable_repr(value)


def find_modules(forward_func: Any) -> List[Tuple[str, Any]]:
    """The modules and tensors that ``forward_func`` computes with, as far as
    they can be reached: the function itself if it is a module, the object of a
    bound method (and the modules and tensors among its attributes), the function
    and arguments of a ``functools.partial``, the variables a closure captures.
    (prefix, module or tensor) pairs."""
    found: List[Tuple[str, Any]] = []
    seen: set = set()

    def visit(obj: Any, prefix: str, depth: int) -> None:
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, (torch.nn.Module, Tensor)):
            found.append((prefix, obj))
            return
        owner = getattr(obj, "__self__", None)
        if owner is not None and not isinstance(owner, type(os)):
            visit(owner, prefix, depth + 1)
        func = getattr(obj, "func", None)  # functools.partial
        if func is not None and hasattr(obj, "args"):
            visit(func, prefix, depth + 1)
            for k, arg in enumerate(getattr(obj, "args", ())):
                visit(arg, f"{prefix}partial.args[{k}].", depth + 1)
            for key, arg in (getattr(obj, "keywords", None) or {}).items():
                visit(arg, f"{prefix}partial.{key}.", depth + 1)
        code = getattr(obj, "__code__", None)
        cells = getattr(obj, "__closure__", None)
        if code is not None and cells:
            for name, cell in zip(code.co_freevars, cells):
                try:
                    content = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                visit(content, f"{prefix}{name}.", depth + 1)
        if code is None and func is None and not callable(getattr(obj, "__func__", None)):
            # a plain object (e.g. a wrapper whose bound method is forward_func):
            # the modules and tensors among its attributes
            for name, attr in sorted(getattr(obj, "__dict__", {}).items()):
                if isinstance(attr, (torch.nn.Module, Tensor)):
                    visit(attr, f"{prefix}{name}.", depth + 1)

    visit(forward_func, "", 0)
    return found


def model_fingerprint(forward_func: Any) -> Dict[str, str]:
    """``{"parameter '<name>'": sha256, "buffer '<name>'": sha256, ...}`` of the
    parameters and buffers ``forward_func`` computes with (names sorted, so the
    order is deterministic); empty when none can be reached. One module is
    named as itself (``'0.weight'``), several by where they were found
    (``'model.0.weight'`` for a closure variable ``model``)."""
    entries: Dict[str, str] = {}
    found = find_modules(forward_func)
    if len(found) == 1:  # one model, however reached: its own parameter names
        found = [("", found[0][1])] if isinstance(found[0][1], torch.nn.Module) else found
    for prefix, obj in found:
        if isinstance(obj, Tensor):
            entries[f"tensor '{prefix.rstrip('.')}'"] = tensor_sha256(obj)
            continue
        for name, param in obj.named_parameters():
            entries[f"parameter '{prefix}{name}'"] = tensor_sha256(param)
        for name, buf in obj.named_buffers():
            entries[f"buffer '{prefix}{name}'"] = tensor_sha256(buf)
    return dict(sorted(entries.items()))


def module_fingerprint_digest(module: torch.nn.Module) -> str:
    return json_sha256(model_fingerprint(module))[:16]


def method_fingerprint(method: Any, method_function: str) -> Dict[str, Any]:
    """The method's class and its settings: the data attributes of the instance
    (plain values, tensors, modules and functions; ``forward_func`` is
    fingerprinted by :func:`model_fingerprint`). Left out: per-call records
    (``last_*``, e.g. ``last_call_cost``), caches (``*_cache``, e.g. SmoothHess's
    subspace basis) and instance-level replacements of methods: a call fills
    them, so a run resumed after one, or on a rank that has made one, would
    otherwise be refused as "method settings differ"."""
    cls = type(method)
    out: Dict[str, Any] = {
        "method": f"{cls.__module__}.{cls.__qualname__}",
        "method_function": method_function,
    }
    module_names: Dict[int, str] = {}
    for _, obj in find_modules(getattr(method, "forward_func", None)):
        if isinstance(obj, torch.nn.Module):
            for name, sub in obj.named_modules():
                module_names.setdefault(id(sub), name)
    simple = (bool, int, float, str, type(None), Tensor, torch.nn.Module, list, tuple, dict,
              torch.dtype, torch.device)
    for name in sorted(getattr(method, "__dict__", {})):
        value = method.__dict__[name]
        if name == "forward_func" or name.startswith("last_") or name.endswith("_cache"):
            continue
        if callable(value) and callable(getattr(cls, name, None)):
            continue  # an instance-level replacement of a method (a wrapper)
        if not (isinstance(value, simple) or callable(value)):
            continue  # helper objects (counters, caches) do not change results
        out[f"method setting '{name.lstrip('_')}'"] = value_fingerprint(value, module_names)
    return out


def describe_differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Human-readable differences between two fingerprints (flat dicts)."""
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    groups: Dict[str, List[str]] = {}
    lines: List[str] = []
    for key in changed:
        match = re.match(r"model (parameter|buffer|tensor) '(.*)'$", key)
        if match:
            kind, name = match.groups()
            state = "" if key in old and key in new else (" added" if key in new else " removed")
            groups.setdefault(kind, []).append(f"'{name}'{state}")
            continue
        lines.append(f"{key} (was {_short(old.get(key, '<unset>'))}, now "
                     f"{_short(new.get(key, '<unset>'))})")
    for kind, names in groups.items():
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
        word = "layer" if len(names) == 1 else "layers"
        lines.insert(0, f"model {kind}s differ ({word} {shown})")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


class InputsHasher:
    """SHA-256 of a chunk's inputs, batch by batch (``update`` with the dict of
    per-batch ``attribute`` arguments, on whatever device they are)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def update(self, per_batch: Dict[str, Any]) -> None:
        hash_value_into(self.digest, per_batch)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


# ---------------------------------------------------------------- files
def chunk_path(out_dir: str, chunk: int) -> str:
    return os.path.join(out_dir, CHUNK_DIR, f"chunk_{chunk:06d}{CHUNK_SUFFIX}")


def _replace_atomically(write: Any, path: str) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``:
    a reader (or a rerun after a kill) sees no file or the whole file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Dict[str, Any]) -> None:
    """Write ``obj`` with a ``"sha256"`` of its canonical content."""
    body = {k: v for k, v in obj.items() if k != "sha256"}
    body["sha256"] = json_sha256(body)

    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(body, fh, indent=1, sort_keys=True)

    _replace_atomically(write, path)


def read_json(path: str, what: str) -> Dict[str, Any]:
    """Read a JSON file written by :func:`write_json`, checking its checksum;
    raises :class:`DatasetStorageError` naming ``path``."""
    if not os.path.exists(path):
        raise DatasetStorageError(path, f"{what} {path} is missing")
    try:
        with open(path, "rb") as fh:
            obj = json.loads(fh.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise DatasetStorageError(path, f"{what} {path} is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise DatasetStorageError(path, f"{what} {path} is not a JSON object")
    stored = obj.get("sha256")
    body = {k: v for k, v in obj.items() if k != "sha256"}
    version = obj.get("version")
    if stored is None and isinstance(version, int) and version < FORMAT_VERSION:
        return obj  # format 1 had no checksum; the caller rejects the version
    if stored != json_sha256(body):
        raise DatasetStorageError(
            path, f"{what} {path} was modified or damaged: its content does not match "
            "its sha256"
        )
    return body


def write_tensors(path: str, tensors: Dict[str, Tensor], metadata: Dict[str, str]) -> None:
    """A safetensors file with a SHA-256 of every tensor in its metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(metadata)
    meta["format"] = FORMAT
    meta["version"] = str(FORMAT_VERSION)
    meta["checksums"] = json.dumps({k: tensor_sha256(v) for k, v in sorted(tensors.items())})
    payload = save(tensors, metadata=meta)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(payload)

    _replace_atomically(write, path)


def read_tensors(
    path: str, what: str, names: Optional[Iterable[str]] = None
) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Tensors (all, or ``names``) and metadata of a file written by
    :func:`write_tensors`, each tensor checked against its SHA-256.
    Raises :class:`DatasetStorageError` naming ``path``."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise DatasetStorageError(path, f"{what} {path} is missing")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            available = set(fh.keys())
            wanted = sorted(available if names is None else names)
            missing = [n for n in wanted if n not in available]
            if missing:
                raise DatasetStorageError(path, f"{what} {path} lacks tensors {missing}")
            tensors = {n: fh.get_tensor(n) for n in wanted}
    except DatasetStorageError:
        raise
    except Exception as err:  # safetensors raises its own error types, or OSError
        size = os.path.getsize(path)
        raise DatasetStorageError(
            path, f"{what} {path} cannot be read ({size} bytes; {type(err).__name__}: {err})"
        ) from None
    if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION):
        raise DatasetStorageError(
            path, f"{what} {path} is not a format-{FORMAT_VERSION} {FORMAT} file "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
        )
    try:
        checksums = json.loads(meta.get("checksums", ""))
    except ValueError:
        raise DatasetStorageError(path, f"{what} {path} has damaged checksums metadata") from None
    for name, tensor in tensors.items():
        if checksums.get(name) != tensor_sha256(tensor):
            raise DatasetStorageError(
                path, f"{what} {path} is damaged: tensor '{name}' does not match its sha256"
            )
    return tensors, meta


def read_chunk(
    out_dir: str, chunk: int, start: int, stop: int, run_digest: str,
    names: Optional[Sequence[str]] = None,
) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """Chunk ``chunk``'s tensors, checked: the file's checksums, that it belongs
    to the run ``run_digest``, that it holds chunk ``chunk`` and examples
    ``[start, stop)``. Raises :class:`DatasetStorageError` naming the file."""
    path = chunk_path(out_dir, chunk)
    wanted = None if names is None else sorted(set(names) | {"indices"})
    tensors, meta = read_tensors(path, f"chunk {chunk}", wanted)
    if meta.get("run_digest") != run_digest:
        raise DatasetStorageError(
            path, f"chunk file {path} belongs to another run (its run digest "
            f"{str(meta.get('run_digest'))[:12]} is not this run's {run_digest[:12]})"
        )
    held = (meta.get("chunk"), meta.get("start"), meta.get("stop"))
    if held != (str(chunk), str(start), str(stop)):
        raise DatasetStorageError(
            path, f"chunk file {path} holds chunk {held[0]} (examples {held[1]}-{held[2]}), "
            f"not chunk {chunk} (examples {start}-{stop}): files swapped or renamed?"
        )
    if not torch.equal(tensors["indices"], torch.arange(start, stop, device="cpu")):
        raise DatasetStorageError(
            path, f"chunk file {path} holds other example indices than {start}-{stop}"
        )
    return tensors, meta


def quarantine(path: str) -> str:
    """Move a damaged file aside (``<path>.damaged``), so a rerun recomputes it
    and the evidence stays; returns the new path."""
    target = path + DAMAGED_SUFFIX
    os.replace(path, target)
    return target


def old_format_files(out_dir: str) -> List[str]:
    """Files of the format-1 layout (torch pickles) in ``out_dir``."""
    found = []
    if os.path.exists(os.path.join(out_dir, OLD_SUMMARY_NAME)):
        found.append(os.path.join(out_dir, OLD_SUMMARY_NAME))
    chunk_dir = os.path.join(out_dir, CHUNK_DIR)
    if os.path.isdir(chunk_dir):
        found += sorted(
            os.path.join(chunk_dir, n) for n in os.listdir(chunk_dir)
            if n.endswith(OLD_CHUNK_SUFFIX)
        )
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest):
        try:
            with open(manifest) as fh:
                version = json.load(fh).get("version")
            if isinstance(version, int) and version < FORMAT_VERSION:
                found.insert(0, manifest)
        except (ValueError, AttributeError, OSError):
            pass
    return found


def old_format_message(out_dir: str, files: List[str]) -> str:
    return (
        f"{out_dir} holds an explain_dataset run in the old format 1 (torch pickles, e.g. "
        f"{files[0]}), which this version does not read: unpickling can execute code. "
        "Recompute it: call explain_dataset with resume=False on this folder (it removes "
        "the old files), or use another out_dir"
    )


def remove_run_files(out_dir: str) -> None:
    """Delete a run's files (chunks, damaged copies, temporaries, summaries,
    manifest, old-format files), never the lock. Call with the lock held."""
    chunk_dir = os.path.join(out_dir, CHUNK_DIR)
    if os.path.isdir(chunk_dir):
        for name in os.listdir(chunk_dir):
            if name.startswith("chunk_"):
                os.remove(os.path.join(chunk_dir, name))
    for name in (MANIFEST_NAME, SUMMARY_TENSORS_NAME, SUMMARY_JSON_NAME, OLD_SUMMARY_NAME):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def remove_temporaries(out_dir: str) -> None:
    """Leftovers of a process killed mid-write. Call with the lock held."""
    for folder in (out_dir, os.path.join(out_dir, CHUNK_DIR)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if ".tmp." in name:
                    os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------- lock
class OutDirLock:
    """An exclusive lock on ``out_dir`` (``filelock``: ``flock`` on POSIX,
    ``msvcrt`` on Windows; released by the OS when the holder dies, so a killed
    run never leaves a stale lock). ``timeout``: seconds to wait, ``None`` to
    wait indefinitely."""

    def __init__(self, out_dir: str, timeout: Optional[float]) -> None:
        from filelock import FileLock

        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.owner_path = os.path.join(out_dir, LOCK_OWNER_NAME)
        self.timeout = -1 if timeout is None else float(timeout)
        self._lock = FileLock(self.path)

    def acquire(self) -> None:
        from filelock import Timeout

        try:
            self._lock.acquire(timeout=self.timeout)
        except Timeout:
            owner = ""
            try:
                with open(self.owner_path) as fh:
                    info = json.load(fh)
                owner = (f" (held by pid {info.get('pid')} on {info.get('host')} since "
                         f"{info.get('since')})")
            except (OSError, ValueError):
                pass
            raise TimeoutError(
                f"explain_dataset: {self.out_dir} is in use by another run{owner}; its "
                f"lock {self.path} was not free within lock_timeout={self.timeout:g} s. "
                "Wait for that run (pass a larger lock_timeout, or None to wait "
                "indefinitely) or use another out_dir; nothing was changed"
            ) from None
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    since=time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            with open(self.owner_path, "w") as fh:
                json.dump(info, fh)
        except OSError:
            warnings.warn(f"explain_dataset could not write {self.owner_path}", RuntimeWarning)

    def release(self) -> None:
        try:
            if os.path.exists(self.owner_path):
                os.remove(self.owner_path)
        finally:
            self._lock.release()


__all__ = [
    "DatasetStorageError",
    "InputsHasher",
    "OutDirLock",
    "chunk_path",
    "describe_differences",
    "method_fingerprint",
    "model_fingerprint",
    "read_chunk",
    "read_json",
    "read_tensors",
    "write_json",
    "write_tensors",
]
