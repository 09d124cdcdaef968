"""One weights file (.safetensors, .bin, .pt), opened once: names, shapes and dtypes now, tensors on request.

Only regular files are opened (a FIFO or a device named like a weights file is refused before
any open), and a pickle is only ever read through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path

import torch

from balora.distributed import is_dtensor
from balora.errors import InputError
from balora.safe_io import regular_file_size

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def one_line(e: BaseException) -> str:
    """An exception's text on one line, at most 300 characters (library errors can be pages)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


class TensorFile:
    """Lazy access to one weights file: names, shapes and dtypes now, tensors on request.

    safetensors: the header is parsed here and tensors are read with safe_open on demand.
    .bin/.pt: torch.load(weights_only=True, mmap=True), so storages stay on disk until used.
    """

    def __init__(self, path: Path, format: str | None = None):
        self.path = Path(path)
        # By suffix, unless the caller knows better (a copy written under the user's chosen name).
        self.format = format or ("safetensors" if self.path.suffix == ".safetensors" else "torch")
        self.metadata: dict[str, str] | None = None
        self._state: dict[str, torch.Tensor] | None = None
        regular_file_size(self.path, "weights file")  # never open a FIFO or a device
        if self.format == "safetensors":
            self._open_safetensors()
        else:
            self._open_torch()

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        self.shapes, self.dtypes = {}, {}
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata()
                for key in f.keys():
                    sl = f.get_slice(key)
                    self.shapes[key] = tuple(sl.get_shape())
                    self.dtypes[key] = _ST_DTYPES.get(sl.get_dtype())
        except Exception as e:  # SafetensorError, OSError: truncated, corrupted or unreadable
            raise InputError(f"{self.path}: not a valid safetensors file ({one_line(e)})") from e
        unknown = [k for k, d in self.dtypes.items() if d is None]
        if unknown:
            raise InputError(f"{self.path}: tensor {unknown[0]!r} has a dtype torch cannot represent")

    def _open_torch(self) -> None:
        _refuse_compressed_records(self.path)
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy non-zip format
        except Exception as e:  # a corrupted pickle can raise almost anything (KeyError, EOFError, ...)
            raise _torch_load_error(self.path, e) from e
        self._state = _flat_tensor_dict(self.path, state)
        self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}
        self.dtypes = {k: v.dtype for k, v in self._state.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in their stored dtype and shape."""
        if self._state is not None:
            return {k: self._state[k] for k in keys}
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except Exception as e:
            raise InputError(f"{self.path}: could not read tensors ({one_line(e)})") from e

    def nbytes(self, key: str) -> int:
        return math.prod(self.shapes[key]) * self.dtypes[key].itemsize


def _refuse_compressed_records(path: Path) -> None:
    """Refuse a zip-format PyTorch file whose records are compressed (torch.save never compresses).

    With mmap, torch maps a record's bytes as they lie in the file, so a re-zipped .bin (deflated
    records) is read as its compressed bytes: wrong values and no error. Without mmap, torch inflates
    each record whole into memory: a deflated data.pkl of zeros is a zip bomb (300 KB -> 300 MB).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            packed = [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except Exception:  # BadZipFile for the legacy (non-zip) format; a damaged file: torch.load says what it is
        return
    if packed:
        raise InputError(
            f"{path}: {len(packed)} of its records are compressed (e.g. {packed[0]!r:.80}): not a file torch.save "
            "wrote (re-zipped?); save the state dict again with torch.save, or convert it to .safetensors"
        )


# torch.save(model.state_dict()) under FSDP2 pickles this rank's DTensor shards: never the whole adapter.
_DTENSOR_SHARDS = ("one rank's shards of an FSDP2 model (DTensors: torch.save of its state_dict), which balora does "
                   "not read; save the whole adapter instead: get_model_state_dict(model, options=StateDictOptions("
                   "full_state_dict=True)) on every rank, then save that from rank 0")


def _torch_load_error(path: Path, e: BaseException) -> InputError:
    if "to load DTensors" in str(e):  # torch's advice (weights_only=False) is neither possible here nor the fix
        return InputError(f"{path}: {_DTENSOR_SHARDS}")
    if isinstance(e, RecursionError):
        return InputError(f"{path}: not a readable PyTorch weights file (nested too deeply)")
    m = re.search(r"WeightsUnpickler error: (Unsupported global: GLOBAL \S+)", str(e))
    if isinstance(e, pickle.UnpicklingError) and m:
        return InputError(
            f"{path}: torch.load(weights_only=True) refused it ({m.group(1)}): the pickle holds Python "
            "objects, not only tensors; balora never unpickles arbitrary code (convert it to .safetensors "
            "in a session you trust)"
        )
    detail = re.search(r"WeightsUnpickler error: (.*?)(?:Check the documentation|$)", " ".join(str(e).split()))
    why = detail.group(1).strip() if detail else one_line(e)
    if not why:  # an empty or cut-off file: EOFError carries no message
        why = f"{type(e).__name__}: the file ends too early (empty or truncated?)"
    return InputError(f"{path}: not a readable PyTorch weights file ({why})")


def _flat_tensor_dict(path: Path, state) -> dict[str, torch.Tensor]:
    """The loaded object if it is {str: Tensor}; otherwise a message that says what it is instead."""
    if not isinstance(state, dict):
        raise InputError(
            f"{path}: expected a flat dict of tensor names to tensors, found a {type(state).__name__} instead"
        )
    for k, v in state.items():
        if not isinstance(k, str):
            raise InputError(
                f"{path}: expected a flat dict of tensor names to tensors, found a {type(k).__name__} key ({k!r:.60})"
            )
        if not isinstance(v, torch.Tensor):
            what = "a nested dict (a full training checkpoint? save only the adapter's state dict)" if isinstance(
                v, dict) else f"a {type(v).__name__}"
            raise InputError(
                f"{path}: expected a flat dict of tensor names to tensors, but {k!r:.80} holds {what} instead"
            )
        if is_dtensor(v):  # loadable once torch.distributed.tensor is imported (a training script, the dashboard)
            raise InputError(f"{path}: {k!r:.80} is a DTensor, {_DTENSOR_SHARDS}")
        if v.layout != torch.strided or v.is_meta or v.is_quantized:
            kind = "a meta tensor (no data)" if v.is_meta else "a quantized tensor" if v.is_quantized else (
                f"a {str(v.layout).removeprefix('torch.')} tensor")
            raise InputError(f"{path}: {k!r:.80} is {kind}; balora reads dense tensors with their values")
    _check_stored_values(path, state)
    return state


def _check_stored_values(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that declare more values than the file stores.

    A pickle rebuilds each tensor from (storage, offset, shape, stride), so a stride-0 tensor or
    many views of one storage declare any number of values from a few stored bytes, and measuring
    or balancing them materialises every one (a 2 KB file, GBs of memory). A view is counted once
    (tied weights: one tensor under two names), and so are a 2-D view and its transpose (PEFT's
    ensure_weight_tying saves lm_head's lora_A / lora_B as transposed views of the embedding's
    lora_embedding_B / _A: the same stored values, read twice at most), so ordinary files, whose
    distinct tensors never overlap, always pass; safetensors files cannot overlap at all.
    """
    stored: dict[int, int] = {}
    views: set[tuple] = set()
    claimed = 0
    for v in state.values():
        storage = v.untyped_storage()
        stored[storage.data_ptr()] = storage.nbytes()
        dims = tuple(zip(v.shape, v.stride()))
        # Only 2-D views are keyed up to the order of their dims: a transpose reads exactly the values
        # of its original, and a 2-D block has just two orders (in d dims one block could be claimed d! times).
        view = (storage.data_ptr(), v.storage_offset(), tuple(sorted(dims)) if v.dim() == 2 else dims, v.dtype)
        if view not in views:
            views.add(view)
            claimed += v.numel() * v.element_size()
    if claimed > sum(stored.values()):
        raise InputError(
            f"{path}: its tensors declare {claimed} bytes of values but the file stores {sum(stored.values())}: "
            "a tensor repeats stored values (stride 0, or views overlapping one storage), so it has more "
            "values than it stores; save each tensor with its own values (safetensors refuses such files)"
        )
