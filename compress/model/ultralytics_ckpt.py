"""Read ultralytics YOLOv5 ``.pt`` checkpoints without running any code stored in the pickle.

An ultralytics checkpoint is a ``torch.save`` pickle of a dict whose ``model`` / ``ema`` is a whole pickled
``models.yolo.Model`` (``DetectionModel`` since v7). A normal ``torch.load`` imports ultralytics' classes
and calls whatever functions the file names. Here a restricted unpickler resolves every global against an
allowlist instead:

- classes of ultralytics' ``models.yolo`` / ``models.common`` / ``models.experimental`` /
  ``utils.activations`` and of ``torch.nn.modules.*`` become inert :class:`StandIn` records of their
  pickled state (never imported, never called);
- tensors, parameters and storages are rebuilt by functions of this module from the archive's raw bytes;
- a few plain containers and numpy's scalar/array reconstructors are allowed;
- every object this module hands to the unpickler refuses pickle's BUILD (no ``Tensor.__setstate__``,
  no attribute writes on our functions), and stand-in classes are made afresh for each file;
- any other global (``posix.system``, ``builtins.eval``, ``subprocess.Popen`` ...) stops the load with a
  UserError naming it.

From the recovered module tree :func:`load_checkpoint` builds the state_dict (ultralytics key names,
fp32), the model YAML, the class names and plain metadata.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import UserError

# Namespaces whose classes are replaced by inert stand-ins (ultralytics YOLOv5 and torch.nn modules).
_STANDIN_MODULES = {"models.yolo", "models.common", "models.experimental", "utils.activations"}
_STANDIN_PREFIXES = ("torch.nn.modules.",)
_STANDIN_CLASSES = {"argparse.Namespace"}  # some forks store ``opt`` as a Namespace

_ROOT_CLASSES = {"models.yolo.Model", "models.yolo.DetectionModel"}
# Module classes that compress's blocks reproduce exactly; anything else in the tree is refused.
_SUPPORTED = {
    "models.yolo.Model", "models.yolo.DetectionModel", "models.yolo.Detect",
    "models.common.Conv", "models.common.C3", "models.common.Bottleneck", "models.common.SPPF",
    "models.common.SPP", "models.common.Focus", "models.common.Concat",
    "torch.nn.modules.conv.Conv2d", "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.SiLU", "utils.activations.SiLU",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.upsampling.Upsample", "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
}
_SILU = {"torch.nn.modules.activation.SiLU", "utils.activations.SiLU"}
_DROPPED_BUFFERS = {"anchor_grid"}  # v5.0-era Detect buffer, recomputed from anchors at run time

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16", "half", "float", "double",
                "int8", "int16", "int32", "int64", "uint8", "bool", "long", "int")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_DEPTH = 64
_MAX_MODULES = 100_000
_MODULE_DICTS = ("_modules", "_parameters", "_buffers")  # what every pickled nn.Module's state holds


class StandIn:
    """Inert record of a pickled object of an allowlisted class: constructor ``args`` and ``state``.

    ``qualname`` is the pickled ``module.Class`` name. Nothing of the real class is imported or run.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<stand-in {self.qualname}>"


class _Refused(Exception):
    """A global outside the allowlist; ``args[0]`` is its ``module.name``."""


class _Corrupt(Exception):
    """The pickle is well-formed but its content is not what torch.save writes."""


class _Sealed:
    """Base of the objects handed to the unpickler: pickle's BUILD on them is refused."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Corrupt(f"unexpected state for {type(self).__name__}")


class _Fn(_Sealed):
    """An allowed function (wrapped so that BUILD cannot set attributes on it)."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


class _StorageType(_Sealed):
    """What ``torch.HalfStorage`` etc. resolve to: only the dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


class _Storage(_Sealed):
    """A loaded storage: a 1-D tensor over its bytes."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor):
        self.data = data


class _TensorType(_Sealed):
    """What ``torch.Tensor`` / ``torch.nn.parameter.Parameter`` resolve to (only as a marker)."""


class TensorRecord(_Sealed):
    """A tensor read from the file, wrapped so that BUILD cannot reach ``Tensor.__setstate__``."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _check_int(x, what):
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise _Corrupt(f"bad tensor {what} {x!r}")
    return x


def _tensor(storage, offset, size, stride, dtype=None):
    """A tensor viewing ``storage`` (bounds-checked), reinterpreted as ``dtype`` when given."""
    if not isinstance(storage, _Storage):
        raise _Corrupt("tensor without a storage")
    base = storage.data
    if dtype is not None and dtype != base.dtype:
        if not isinstance(dtype, torch.dtype):
            raise _Corrupt(f"bad tensor dtype {dtype!r}")
        base = base.view(torch.uint8).view(dtype)
    offset = _check_int(offset, "offset")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise _Corrupt("bad tensor size/stride")
    size = tuple(_check_int(s, "size") for s in size)
    stride = tuple(_check_int(s, "stride") for s in stride)
    if 0 in size:
        return TensorRecord(torch.empty(size, dtype=base.dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if math.prod(size) > max(base.numel(), 1 << 24):  # zero strides could fake a huge tensor
        raise _Corrupt(f"tensor of size {size} is far larger than its storage")
    if last >= base.numel():
        raise _Corrupt(f"tensor of size {size} reaches past its storage of {base.numel()} elements")
    return TensorRecord(torch.as_strided(base, size, stride, offset))


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *_):
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, *_):
    if not isinstance(data, TensorRecord):
        raise _Corrupt("parameter without tensor data")
    return data


_REBUILDERS = {name: _Fn(f) for name, f in (
    ("_rebuild_tensor", _rebuild_tensor), ("_rebuild_tensor_v2", _rebuild_tensor),
    ("_rebuild_tensor_v3", _rebuild_tensor_v3), ("_rebuild_parameter", _rebuild_parameter),
    ("_rebuild_parameter_with_state", _rebuild_parameter))}


def _rebuild_from_type(func, new_type, args, state):
    # Tensor subclasses / tensors with python attributes: rebuild the plain tensor, drop the extras.
    if (not any(func is f for f in _REBUILDERS.values()) or not isinstance(new_type, _TensorType)
            or not isinstance(args, tuple)):
        raise _Corrupt("unexpected tensor reconstruction")
    return func(*args)


def _size(seq=()):
    return tuple(_check_int(x, "size") for x in seq)


def _latin1(text, encoding="latin1"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Corrupt("unexpected _codecs.encode call")
    return text.encode("latin1")


def _bytes(data=b""):
    if not isinstance(data, (bytes, bytearray)):
        raise _Corrupt("unexpected bytes() call")
    return bytes(data)


def _bytearray(data=b""):
    return bytearray(_bytes(data))


def _path(*parts):
    if not all(isinstance(p, str) for p in parts):
        raise _Corrupt("unexpected path parts")
    return str(Path(*parts)) if parts else "."


def _numpy_globals() -> dict:
    """numpy's own scalar/array reconstructors, under both numpy 1 and numpy 2 module spellings."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch here
        return {}
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    out = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[f"{mod}._reconstruct"] = reconstruct
        out[f"{mod}.scalar"] = scalar
    return out


def _allowed_globals() -> dict:
    tensor_type = _TensorType()
    g = {f"torch._utils.{name}": fn for name, fn in _REBUILDERS.items()}
    g.update({
        "torch._tensor._rebuild_from_type_v2": _Fn(_rebuild_from_type),
        "torch.Tensor": tensor_type,
        "torch.nn.parameter.Parameter": tensor_type,
        "torch.Size": _Fn(_size),
        "collections.OrderedDict": collections.OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytes": _Fn(_bytes),
        "builtins.bytearray": _Fn(_bytearray),
        "_codecs.encode": _Fn(_latin1),
    })
    path = _Fn(_path)
    for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        g[f"pathlib.{cls}"] = g[f"pathlib._local.{cls}"] = path
    for name in _DTYPE_NAMES:
        g[f"torch.{name}"] = getattr(torch, name)
    for name, dtype in _STORAGE_DTYPES.items():
        g[f"torch.{name}"] = _StorageType(dtype)
    g.update(_numpy_globals())
    return g


_ALLOWED: dict | None = None


def _normalize(module: str, name: str) -> tuple[str, str]:
    """Python-2 spellings in protocol-2 pickles (``__builtin__``) to Python 3's, as pickle does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _Unpickler(pickle.Unpickler):
    """An unpickler that resolves globals only from the allowlist and storages via ``load_storage``."""

    def __init__(self, f, load_storage=None):
        super().__init__(f)
        self._load_storage = load_storage
        self._standins: dict[str, type] = {}  # fresh per file: nothing one file does reaches another

    def find_class(self, module, name):
        global _ALLOWED
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Corrupt("non-string global name")
        module, name = _normalize(module, name)
        qual = f"{module}.{name}"
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        if qual in _ALLOWED:
            return _ALLOWED[qual]
        if "." not in name and (module in _STANDIN_MODULES or module.startswith(_STANDIN_PREFIXES)
                                or qual in _STANDIN_CLASSES):
            if qual not in self._standins:
                self._standins[qual] = type(name, (StandIn,), {"qualname": qual, "__module__": __name__})
            return self._standins[qual]
        raise _Refused(qual)

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise _Corrupt("unexpected persistent id")
        return self._load_storage(pid)


def _element_size(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _from_bytes(raw: bytes, dtype, big_endian: bool) -> torch.Tensor:
    es = _element_size(dtype)
    if len(raw) % es:
        raise _Corrupt("storage size is not a multiple of its element size")
    if not raw:
        return torch.empty(0, dtype=dtype)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if big_endian and es > 1:
        t = t.view(-1, es).flip(1).contiguous().view(-1)
    return t.view(dtype)


def _storage_id(pid, n):
    if not (isinstance(pid, tuple) and len(pid) == n and pid[0] in ("storage", b"storage")):
        raise _Corrupt(f"unexpected persistent id {str(pid)[:60]}")
    if not isinstance(pid[1], _StorageType):
        raise _Corrupt("storage of an unknown type")
    return pid


def _read_zip(f, file_size: int):
    """Unpickle a torch >= 1.6 zip checkpoint (``<dir>/data.pkl`` + ``<dir>/data/<key>``)."""
    zf = zipfile.ZipFile(f)
    names = set(zf.namelist())
    budget = [8 * file_size + (1 << 20)]  # torch stores records uncompressed; this stops zip bombs

    def read(name):
        budget[0] -= zf.getinfo(name).file_size
        if budget[0] < 0:
            raise _Corrupt("records expand far beyond the file size (a zip bomb?)")
        return zf.read(name)

    pkl = sorted(n for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    if not pkl:
        raise _Corrupt("a zip archive without data.pkl (not written by torch.save)")
    prefix = pkl[0][: -len("data.pkl")]
    big = prefix + "byteorder" in names and read(prefix + "byteorder").strip() == b"big"
    storages: dict[str, _Storage] = {}

    def load(pid):
        _, stype, key, _location, _numel = _storage_id(pid, 5)
        key = str(key)
        if key not in storages:
            record = f"{prefix}data/{key}"
            if record not in names:
                raise _Corrupt(f"missing storage record data/{key}")
            storages[key] = _Storage(_from_bytes(read(record), stype.dtype, big))
        return storages[key]

    return _Unpickler(io.BytesIO(read(pkl[0])), load).load()


def _read_legacy(f, file_size: int):
    """Unpickle a pre-1.6 checkpoint: magic, protocol, sys_info, object, storage keys, raw storages."""
    if _Unpickler(f).load() != _LEGACY_MAGIC:
        raise _Corrupt("not a torch.save file (no zip archive, no legacy magic number)")
    if _Unpickler(f).load() != _LEGACY_PROTOCOL:
        raise _Corrupt("unknown legacy protocol version")
    info = _Unpickler(f).load()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise _Corrupt("big-endian legacy checkpoints are not supported")
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}
    budget = [file_size]  # every storage's bytes follow in the file

    def load(pid):
        if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
            if len(pid) > 1 and isinstance(pid[1], type) and issubclass(pid[1], StandIn):
                return pid[1]
            raise _Corrupt("unexpected module reference")
        _, stype, key, _location, numel, view = _storage_id(pid, 6)
        key = str(key)
        if key not in roots:
            budget[0] -= _check_int(numel, "storage size") * _element_size(stype.dtype)
            if budget[0] < 0:
                raise _Corrupt("storages larger than the file")
            roots[key] = _Storage(torch.zeros(numel, dtype=stype.dtype))
        if view is None:
            return roots[key]
        vkey, off, n = view
        if str(vkey) not in views:
            lo, n = _check_int(off, "offset"), _check_int(n, "size")
            views[str(vkey)] = _Storage(roots[key].data[lo:lo + n])
        return views[str(vkey)]

    obj = _Unpickler(f, load).load()
    keys = _Unpickler(f).load()
    for key in keys:  # raw bytes follow in this order, each after an int64 element count
        st = roots.get(str(key))
        if st is None:
            raise _Corrupt(f"unknown storage key {key!r}")
        head = f.read(8)
        if len(head) < 8:
            raise EOFError("file ends inside the tensor data")
        (numel,) = struct.unpack("<q", head)
        if numel != st.data.numel():
            raise _Corrupt(f"storage {key} holds {numel} elements, expected {st.data.numel()}")
        raw = f.read(numel * st.data.element_size())
        if len(raw) < numel * st.data.element_size():
            raise EOFError("file ends inside the tensor data")
        st.data.view(torch.uint8).copy_(_from_bytes(raw, torch.uint8, False))
    return obj


def _unpickle(path):
    """Unpickle a ``torch.save`` file with the allowlist: stand-ins for modules, tensors on the CPU.

    Reads the zip format (torch >= 1.6) and the legacy format. Raises UserError naming the file for a
    refused global, a truncated or corrupt file, or a file that is not a torch checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: empty file, not a PyTorch checkpoint")
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                return _read_zip(f, size)
            f.seek(0)
            head = f.read(4)
            if head == b"PK\x03\x04":
                raise UserError(f"{path}: truncated or corrupt checkpoint (a zip archive without its directory)")
            if head[:1] != b"\x80":  # every torch.save pickle starts with the PROTO opcode
                raise UserError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
            f.seek(0)
            return _read_legacy(f, size)
    except _Refused as e:
        qual = e.args[0]
        hint = (" (an ultralytics>=8 package checkpoint; only YOLOv5 checkpoints are supported)"
                if qual.startswith("ultralytics.") else "")
        raise UserError(f"{path}: refused to load: the pickle references '{qual}', which is not allowed in "
                        f"a YOLOv5 checkpoint (it could run arbitrary code){hint}") from None
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (nested too deeply)") from None
    except Exception as e:  # corrupt pickles raise many types; the file is at fault either way
        what = ("truncated or corrupt file" if isinstance(e, (EOFError, zipfile.BadZipFile))
                else "not a readable PyTorch checkpoint")
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(f"{path}: {what} ({msg})") from None


def _describe(obj) -> str:
    if isinstance(obj, StandIn):
        return obj.qualname
    if isinstance(obj, TensorRecord):
        return "a tensor"
    return "None" if obj is None else f"a {type(obj).__name__}"


_SKIP = object()


def _plain(x, budget=None, depth=0):
    """``x`` as plain data (str/int/float/bool/None, lists, dicts); ``_SKIP`` when it is not.

    ``budget`` (a one-item list) caps the items visited, so shared or cyclic references cannot blow up.
    """
    budget = [100_000] if budget is None else budget
    budget[0] -= 1
    if depth > 16 or budget[0] < 0:
        return _SKIP
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, TensorRecord):
        return x.tensor.tolist() if x.tensor.numel() <= 1000 else _SKIP
    if hasattr(x, "dtype") and hasattr(x, "tolist") and type(x).__module__ == "numpy":
        return _plain(x.tolist(), budget, depth + 1) if getattr(x, "size", 1) <= 1000 else _SKIP
    if isinstance(x, StandIn) and x.qualname == "argparse.Namespace":
        x = x.state
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [_plain(v, budget, depth + 1) for v in x]
        return [v for v in items if v is not _SKIP]
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            v = _plain(v, budget, depth + 1)
            if isinstance(k, (str, int)) and v is not _SKIP:
                out[k] = v
        return out
    return _SKIP


def _module_parts(m, name, path):
    st = m.state if isinstance(m, StandIn) else None
    if not isinstance(st, dict) or not all(isinstance(st.get(k), dict) for k in _MODULE_DICTS):
        raise UserError(f"{path}: layer '{name or 'model'}' ({_describe(m)}) is not a pickled torch module")
    return st


def _check_module(m, name, path):
    qual = m.qualname
    if qual not in _SUPPORTED:
        raise UserError(f"{path}: layer '{name}' is {qual}, which compress's YOLOv5 blocks do not implement")
    if qual == "models.common.Conv":
        kids = m.state["_modules"]
        if "bn" not in kids:
            raise UserError(f"{path}: layer '{name}' is a fused Conv (no BatchNorm); give an unfused checkpoint")
        act = kids.get("act")
        if not (isinstance(act, StandIn) and act.qualname in _SILU):
            raise UserError(f"{path}: layer '{name}' uses activation {_describe(act)}; compress's Conv is "
                            f"Conv2d + BatchNorm2d + SiLU")


def _collect(m, prefix, out, path, depth=0, visits=None):
    """Fill ``out`` with the module tree's persistent parameters and buffers under dotted names."""
    name = prefix[:-1]
    visits = [0] if visits is None else visits
    visits[0] += 1
    if depth > _MAX_DEPTH or visits[0] > _MAX_MODULES:
        raise UserError(f"{path}: module tree nested too deeply or too large at '{name}'")
    st = _module_parts(m, name, path)
    _check_module(m, name or "model", path)
    skip = st.get("_non_persistent_buffers_set") or set()
    tensors = list(st["_parameters"].items()) + [
        (k, v) for k, v in st["_buffers"].items() if k not in skip and k not in _DROPPED_BUFFERS]
    for k, v in tensors:
        if v is None:
            continue
        if not isinstance(v, TensorRecord):
            raise UserError(f"{path}: '{prefix}{k}' is {_describe(v)}, not a tensor")
        v = v.tensor
        out[prefix + k] = (v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone()).contiguous()
    for k, child in st["_modules"].items():
        if child is not None:
            _collect(child, f"{prefix}{k}.", out, path, depth + 1, visits)


def _names(raw, nc):
    if isinstance(raw, dict):  # v7+: {0: 'person', ...}
        raw = [raw[k] for k in sorted(raw)] if all(isinstance(k, int) for k in raw) else list(raw.values())
    if not isinstance(nc, int):
        return None
    if isinstance(raw, (list, tuple)) and len(raw) == nc:
        return [str(x) for x in raw]
    return [str(i) for i in range(nc)]


def load_checkpoint(path) -> dict:
    """Read an ultralytics YOLOv5 checkpoint safely (no pickled code is run).

    Returns ``{"cfg": dict, "state_dict": {name: tensor}, "names": [str], "meta": dict}``: ``cfg`` is the
    model YAML ultralytics stored in ``model.yaml`` (``nc`` set to the model's), ``state_dict`` fp32
    tensors with ultralytics key names (``ema`` preferred over ``model``, ``anchor_grid`` and
    non-persistent buffers dropped), ``meta`` plain data (epoch, date, stride, opt, ...). Raises UserError
    naming the file for unsafe, corrupt or non-YOLOv5 files.
    """
    path = Path(path)
    ck = _unpickle(path)
    if not isinstance(ck, dict):
        raise UserError(f"{path}: not an ultralytics YOLOv5 checkpoint (holds {_describe(ck)}, expected a "
                        f"dict with a 'model' entry)")
    if ck.get("model") is None and ck.get("ema") is None:
        if ck and all(isinstance(v, TensorRecord) for v in ck.values()) or isinstance(ck.get("state_dict"), dict):
            raise UserError(f"{path}: a plain state_dict, not an ultralytics checkpoint: pass its model YAML "
                            f"with --cfg")
        keys = ", ".join(repr(k) for k in list(ck)[:6])
        raise UserError(f"{path}: not an ultralytics YOLOv5 checkpoint (no 'model' entry; keys: {keys or 'none'})")
    source = "ema" if ck.get("ema") is not None else "model"
    root = ck[source]
    if not (isinstance(root, StandIn) and root.qualname in _ROOT_CLASSES):
        raise UserError(f"{path}: '{source}' is {_describe(root)}, not a YOLOv5 detection model "
                        f"(models.yolo.Model or models.yolo.DetectionModel)")
    st = _module_parts(root, "", path)
    seq = st["_modules"].get("model")
    seq_st = _module_parts(seq, "model", path) if seq is not None else {}
    layers = list(seq_st.get("_modules", {}).values())
    detect = layers[-1] if layers else None
    if not (isinstance(detect, StandIn) and detect.qualname == "models.yolo.Detect"):
        raise UserError(f"{path}: the model's last layer is {_describe(detect)}, not a YOLOv5 Detect head")

    cfg = _plain(st.get("yaml"))
    if not (isinstance(cfg, dict) and "backbone" in cfg and "head" in cfg):
        raise UserError(f"{path}: the model has no readable YAML ('yaml' attribute with backbone and head)")
    det_st = _module_parts(detect, f"model.{len(layers) - 1}", path)
    nc = st.get("nc", det_st.get("nc"))
    if isinstance(nc, int) and not isinstance(nc, bool) and nc > 0 and nc != cfg.get("nc"):
        cfg["nc"] = nc  # ultralytics overrides the YAML's nc with the dataset's
    cfg["yaml_file"] = f"{path} (embedded model YAML)"  # so YAML errors name the checkpoint

    sd: dict[str, torch.Tensor] = {}
    _collect(root, "", sd, path)
    stride = _plain(st.get("stride", det_st.get("stride")))
    meta = {k: v for k, v in ((k, _plain(v)) for k, v in ck.items()
                              if isinstance(k, str) and k not in ("model", "ema", "optimizer"))
            if v is not _SKIP}
    meta.update(source=source, model_class=root.qualname,
                stride=stride if stride is not _SKIP else None)
    names = _names(st.get("names", ck.get("names")), cfg.get("nc"))
    return {"cfg": cfg, "state_dict": sd, "names": names, "meta": meta}
