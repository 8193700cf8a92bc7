"""Read ultralytics YOLOv5 ``.pt`` checkpoints without running any code stored in the pickle.

An ultralytics checkpoint is a ``torch.save`` pickle of a dict whose ``model`` / ``ema`` is a whole pickled
``models.yolo.Model`` (``DetectionModel`` since v7). A normal ``torch.load`` imports ultralytics' classes
and calls whatever functions the file names. Here the file is read by pickle's pure-Python unpickler with
every opcode that builds or fills an object replaced by ours, so nothing in the file reaches code we did
not choose:

- globals resolve only against an allowlist. Classes of ultralytics' ``models.yolo`` / ``models.common`` /
  ``models.experimental`` / ``utils.activations``, of ``torch.nn.modules.*`` and ``argparse.Namespace``
  become inert :class:`StandIn` records of their pickled arguments and state (never imported, never
  called); stand-in classes are made afresh for each file. Any other global (``posix.system``,
  ``builtins.eval``, ``subprocess.Popen`` ...) stops the load with a UserError naming it;
- calls (REDUCE, NEWOBJ, INST, OBJ) reach only stand-in classes and this module's own functions;
- pickle's BUILD (``__setstate__``) is honoured only on stand-in records (once each), on OrderedDicts
  (only the ``_metadata`` attribute that torch writes, which is dropped) and on our numpy records
  (once, validated); BUILD on anything else (a tensor, a function, a dict, a type) stops the load;
- SETITEM(S) / APPEND(S) / ADDITEMS fill only dicts and OrderedDicts, lists and sets, and dict keys and
  set items must be str, bytes, bool, None or ints below the hash modulus (their hashes cannot be made
  to collide, so no hash flooding);
- tensors and storages are rebuilt by this module from the archive's raw bytes, bounds-checked;
- numpy values are rebuilt by this module too: ``numpy.dtype``, ``numpy.ndarray`` and numpy's
  ``_reconstruct`` / ``scalar`` / ``_frombuffer`` resolve to sealed records of their arguments and state.
  A dtype must be plain numbers (bool, int, uint, float or complex, at most 16 bytes: no structured,
  object or sub-array dtypes) and its state is set at most once, before it is used; a real array is made
  only once its dtype, shape and byte length agree (so its size is bounded by bytes the pickle holds);
  scalars become Python numbers.

Budgets, so that no file can exhaust memory or time: the pickle stream is charged per opcode (an
estimate of what it builds, at most ``_PICKLE_BUDGET``); zip records may expand to at most 8x the file
size (no zip bombs); the tensors :func:`load_checkpoint` copies out (fp32) may take at most
4x the bytes of the storages the file holds plus 16 MiB (a zero-stride view, or one view referenced many
times, cannot blow up: a record referenced twice is copied once); metadata is converted under an item
budget; and the embedded model YAML is bounded, then built on the meta device and must not describe more
parameters than the file stores, before ``load_model`` builds anything for real.

From the recovered module tree :func:`load_checkpoint` builds the state_dict (ultralytics key names,
fp32), the model YAML, the class names and plain metadata. Every problem with a file, crafted or merely
corrupt, is a one-line UserError naming it.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UserError
from .rules import BY_PICKLED
from .yolo import _build_layers, parse_cfg

# Namespaces whose classes are replaced by inert stand-ins (ultralytics YOLOv5 and torch.nn modules).
_STANDIN_MODULES = {"models.yolo", "models.common", "models.experimental", "utils.activations"}
_STANDIN_PREFIXES = ("torch.nn.modules.",)
_STANDIN_CLASSES = {"argparse.Namespace"}  # some forks store ``opt`` as a Namespace

_ROOT_CLASSES = {"models.yolo.Model", "models.yolo.DetectionModel"}
# Module classes compress reproduces exactly: the blocks of the rule table (compress.model.rules) and the
# torch.nn layers inside them; anything else in the tree is refused.
_LAYERS = {
    "torch.nn.modules.conv.Conv2d", "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.SiLU", "utils.activations.SiLU", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.ReLU6", "torch.nn.modules.activation.Hardswish",
    "torch.nn.modules.activation.Sigmoid", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.upsampling.Upsample", "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Identity",
}
_SUPPORTED = _ROOT_CLASSES | _LAYERS | set(BY_PICKLED)
_DROPPED_BUFFERS = {"anchor_grid"}  # v5.0-era Detect buffer, recomputed from anchors at run time

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = ("float16", "float32", "float64", "bfloat16", "half", "float", "double",
                "int8", "int16", "int32", "int64", "uint8", "bool", "long", "int")
# numpy type codes as numpy pickles them ('f8', 'i4', 'b1' ...): plain numbers only (no longdouble).
_NUMPY_CODES = re.compile(r"b1|[iu](1|2|4|8)|f(2|4|8)|c(8|16)")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_DEPTH = 64
_MAX_MODULES = 100_000
_MODULE_DICTS = ("_modules", "_parameters", "_buffers")  # what every pickled nn.Module's state holds

_MAX_INT = 1 << 62            # tensor sizes, strides, offsets and numpy dims
_MAX_DIMS = 32
_MAX_KEY_INT = (1 << 61) - 2  # ints below the hash modulus hash to themselves: no two collide
_MAX_MEMO = 1 << 32
_PICKLE_BUDGET = 64 << 20     # estimated bytes the pickle may build (ultralytics yolov5s: 3 MiB)
_NEW_CLASS_COST = 4096        # a stand-in class made for a new global name
_ZIP_EXPANSION = 8            # records may expand to this multiple of the file size (+1 MiB)
_TENSOR_FACTOR, _TENSOR_SLACK = 4, 16 << 20  # tensors copied out <= 4x the stored bytes + 16 MiB
_PLAIN_ITEMS = 100_000        # items (and tensor/array elements) made plain: per YAML, all metadata
_MAX_NC = 100_000
_MAX_ROWS, _MAX_REPEATS, _MAX_CFG_INT = 1000, 1000, 1 << 20


class _Refused(Exception):
    """The file asks for something no YOLOv5 checkpoint needs; ``args[0]`` says what, in the user's terms."""


class _Corrupt(Exception):
    """The pickle is well-formed but its content is not what torch.save writes."""


def _printable(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, anything unprintable as '?' (so messages stay one line)."""
    cut = text[:limit]
    return "".join(c if c.isprintable() else "?" for c in cut) + ("..." if len(text) > limit else "")


def _describe(obj) -> str:
    """What ``obj`` is, in a few words, without calling anything of it (no repr of file data)."""
    if isinstance(obj, StandIn):
        return obj.qualname
    if isinstance(obj, type) and issubclass(obj, StandIn):
        return f"the class {obj.qualname}"
    if isinstance(obj, _Sealed):
        return obj.what()
    if obj is None:
        return "None"
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _shown(x) -> str:
    """A short, one-line rendering of a value read from the file (for messages)."""
    if type(x) is str:
        return repr(_printable(x, 40))
    if type(x) in (int, bool) and abs(x) < 10**30:
        return str(x)
    if type(x) is float:
        return repr(x)
    return _describe(x)


class StandIn:
    """Inert record of a pickled object of an allowlisted class: constructor ``args`` and ``state``.

    ``qualname`` is the pickled ``module.Class`` name. Nothing of the real class is imported or run; the
    unpickler sets ``state`` at most once (pickle's BUILD).
    """

    __slots__ = ("args", "state", "_built")
    qualname = "?"

    def __init__(self, *args):
        self.args, self.state, self._built = args, {}, False

    def _build(self, state):
        if self._built:
            raise _Refused(f"the pickle sets the state of {self.qualname} twice")
        self.state, self._built = state, True

    def __repr__(self):
        return f"<stand-in {self.qualname}>"


class _Sealed:
    """Base of the objects this module hands to the unpickler: no instance dict, BUILD refused.

    (Our BUILD opcode already refuses them; ``__setstate__`` refuses too, should anything else unpickle
    them.) ``kind`` says what the object is in messages.
    """

    __slots__ = ()
    kind = "an internal object"

    def what(self) -> str:
        return self.kind

    def __setstate__(self, state):
        raise _Corrupt(f"unexpected state for {self.what()}")


class _Fn(_Sealed):
    """An allowed function, under the global name the pickle uses for it."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def what(self) -> str:
        return f"the function {self.name}"


class _StorageType(_Sealed):
    """What ``torch.HalfStorage`` etc. resolve to: only the dtype."""

    __slots__ = ("dtype",)
    kind = "a storage type"

    def __init__(self, dtype):
        self.dtype = dtype


class _Storage(_Sealed):
    """A loaded storage: a 1-D tensor over its bytes."""

    __slots__ = ("data",)
    kind = "a storage"

    def __init__(self, data: torch.Tensor):
        self.data = data


class _TensorType(_Sealed):
    """What ``torch.Tensor`` / ``torch.nn.parameter.Parameter`` resolve to (only as a marker)."""

    __slots__ = ()
    kind = "the class torch.Tensor"


class TensorRecord(_Sealed):
    """A tensor read from the file (a bounds-checked view of its storage; never ``Tensor.__setstate__``)."""

    __slots__ = ("tensor",)
    kind = "a tensor"

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _check_int(x, what):
    if type(x) is not int or not 0 <= x < _MAX_INT:
        raise _Corrupt(f"bad {what} {_shown(x)}")
    return x


def _tensor(storage, offset, size, stride, dtype=None):
    """A tensor viewing ``storage`` (bounds-checked), reinterpreted as ``dtype`` when given."""
    if not isinstance(storage, _Storage):
        raise _Corrupt(f"tensor without a storage (got {_describe(storage)})")
    base = storage.data
    if dtype is not None and dtype != base.dtype:
        if not isinstance(dtype, torch.dtype):
            raise _Corrupt(f"bad tensor dtype {_describe(dtype)}")
        base = base.view(torch.uint8).view(dtype)
    offset = _check_int(offset, "tensor offset")
    if (type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride)
            or len(size) > _MAX_DIMS):
        raise _Corrupt("bad tensor size/stride")
    size = tuple(_check_int(s, "tensor size") for s in size)
    stride = tuple(_check_int(s, "tensor stride") for s in stride)
    if 0 in size:
        return TensorRecord(torch.empty(size, dtype=base.dtype))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    # A view may exceed its storage (expand() gives zero strides); copying one out is charged later.
    if math.prod(size) > max(base.numel(), 1 << 24):
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


_REBUILDERS = {"_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor,
               "_rebuild_tensor_v3": _rebuild_tensor_v3, "_rebuild_parameter": _rebuild_parameter,
               "_rebuild_parameter_with_state": _rebuild_parameter}


def _rebuild_from_type(func, new_type, args, state):
    # Tensor subclasses / tensors with python attributes: rebuild the plain tensor, drop the extras.
    if (not (type(func) is _Fn and func.fn in _REBUILDERS.values()) or not isinstance(new_type, _TensorType)
            or type(args) is not tuple):
        raise _Corrupt("unexpected tensor reconstruction")
    return func.fn(*args)


class _NumpyType(_Sealed):
    """What ``numpy.ndarray`` resolves to: only a marker for ``_reconstruct``; calling it is refused."""

    __slots__ = ()
    kind = "numpy.ndarray directly"


class NumpyDType(_Sealed):
    """A pickled ``numpy.dtype`` of plain numbers: its type code and byte order, nothing else.

    Its state (pickle's BUILD) may be set once, before the dtype is used; only the state numpy writes for
    a plain number dtype is accepted.
    """

    __slots__ = ("code", "order", "_built", "_used")
    kind = "a numpy dtype"

    def __init__(self, code: str):
        self.code, self.order, self._built, self._used = code, "=", False, False

    def _build(self, state):
        if self._built or self._used:
            raise _Refused("the pickle changes a numpy dtype after setting or using it")
        # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (type(state) is tuple and len(state) in (8, 9) and state[0] in (3, 4)):
            raise _Corrupt("unexpected numpy dtype state")
        order, rest = state[1], state[2:]
        plain = (None, None, None, -1, -1, 0, None)[: len(rest)]
        if order not in ("<", ">", "|", "=") or any(type(a) is not type(b) or a != b for a, b in zip(rest, plain)):
            raise _Refused("a numpy dtype with fields, objects or sub-arrays (only plain numbers are allowed)")
        self.order, self._built = order, True

    def numpy(self):
        """The real numpy dtype; from now on the state is final."""
        import numpy as np

        self._used = True
        dt = np.dtype(self.code)
        return dt if self.order in ("=", "|") else dt.newbyteorder(self.order)


class NumpyArray(_Sealed):
    """A numpy array rebuilt by us: ``array`` is set (once) when its dtype, shape and bytes agree."""

    __slots__ = ("array",)
    kind = "a numpy array"

    def __init__(self):
        self.array = None

    def _build(self, state):
        # numpy writes (version, shape, dtype, is_fortran, raw bytes); version 0 had no version field
        if self.array is not None:
            raise _Refused("the pickle changes a numpy array after making it")
        if type(state) is not tuple or len(state) not in (4, 5) or (len(state) == 5 and state[0] != 1):
            raise _Corrupt("unexpected numpy array state")
        shape, dtype, fortran, raw = state[-4:]
        if type(fortran) is not bool:
            raise _Corrupt("unexpected numpy array state")
        self.array = _np_array(raw, dtype, shape, "F" if fortran else "C")


def _np_array(raw, dtype, shape, order):
    """A real numpy array over ``raw`` once dtype, shape and byte length check out (no other allocation)."""
    import numpy as np

    if not isinstance(dtype, NumpyDType):
        raise _Refused(f"a numpy array of {_describe(dtype)} (only plain number dtypes are allowed)")
    if type(raw) not in (bytes, bytearray):
        raise _Corrupt("numpy array data is not bytes")
    if type(shape) is not tuple or len(shape) > _MAX_DIMS:
        raise _Corrupt("bad numpy array shape")
    shape = tuple(_check_int(n, "numpy array dimension") for n in shape)
    dt = dtype.numpy()
    need = math.prod(shape) * dt.itemsize
    if need != len(raw):
        raise _Corrupt(f"a numpy array of shape {shape} needs {need} bytes, the pickle holds {len(raw)}")
    arr = np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order=order)
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    return arr != 0 if dt.kind == "b" else arr  # bools from bytes other than 0/1 become plain bools


def _np_dtype(code, align=False, copy=False):
    """``numpy.dtype(code, align, copy)`` as numpy pickles it, for plain number codes only."""
    import numpy as np

    if type(code) is not str or not _NUMPY_CODES.fullmatch(code) or type(align) not in (bool, int):
        what = f"numpy dtype {_shown(code)}" if type(code) is str else f"a numpy dtype made from {_describe(code)}"
        raise _Refused(f"{what} (only bool, int, uint, float and complex numbers are allowed)")
    dt = np.dtype(code)
    if dt.kind != code[0] or dt.itemsize != int(code[1:]) or dt.fields is not None or dt.hasobject:
        raise _Refused(f"numpy dtype {_shown(code)} is not a plain number type here")
    return NumpyDType(code)


def _np_reconstruct(subtype, shape, code):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b'), then BUILD with its real state
    if not isinstance(subtype, _NumpyType) or type(shape) is not tuple or shape != (0,) or code not in (b"b", "b"):
        raise _Refused("a numpy array in a form numpy does not pickle (a subclass or odd arguments)")
    return NumpyArray()


def _np_frombuffer(buf, dtype, shape, order):
    # numpy >= 1.16 with pickle protocol 5
    if order not in ("C", "F"):
        raise _Corrupt("bad numpy array order")
    arr = NumpyArray()
    arr.array = _np_array(buf, dtype, shape, order)
    return arr


def _np_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar(dtype, bytes)`` as a Python number."""
    if not isinstance(dtype, NumpyDType):
        raise _Refused(f"a numpy scalar of {_describe(dtype)} (only plain number dtypes are allowed)")
    return _np_array(data, dtype, (), "C").item()


def _size(seq=()):
    if type(seq) not in (tuple, list) or len(seq) > _MAX_DIMS:
        raise _Corrupt("bad torch.Size")
    return tuple(_check_int(x, "size") for x in seq)


def _latin1(text, encoding="latin1"):
    # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Corrupt("unexpected _codecs.encode call")
    return text.encode("latin1")


def _bytes(data=b""):
    if type(data) not in (bytes, bytearray):
        raise _Corrupt("unexpected bytes() call")
    return bytes(data)


def _bytearray(data=b""):
    return bytearray(_bytes(data))


def _path(*parts):
    if not all(type(p) is str for p in parts):
        raise _Corrupt("unexpected path parts")
    return str(Path(*parts)) if parts else "."


def _check_key(k):
    """A dict key or set item from the file: only types whose hashes cannot be made to collide."""
    t = type(k)
    if t is str or t is bytes or t is bool or k is None or (t is int and -_MAX_KEY_INT <= k <= _MAX_KEY_INT):
        return k
    raise _Refused(f"a dict key or set item that is {_describe(k) if t is not int else 'a huge int'} "
                   f"(only str, bytes, bool, None and ints are allowed)")


def _items(items):
    if type(items) not in (list, tuple):
        raise _Corrupt("unexpected set/OrderedDict contents")
    return items


def _set(items=()):
    return {_check_key(x) for x in _items(items)}


def _frozenset(items=()):
    return frozenset(_check_key(x) for x in _items(items))


def _odict(items=()):
    pairs = _items(items)
    if not all(type(p) in (list, tuple) and len(p) == 2 for p in pairs):
        raise _Corrupt("unexpected OrderedDict contents")
    return collections.OrderedDict((_check_key(k), v) for k, v in pairs)


def _allowed_globals() -> dict:
    fns = {f"torch._utils.{name}": fn for name, fn in _REBUILDERS.items()}
    fns.update({
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
        "torch.Size": _size,
        "collections.OrderedDict": _odict,
        "builtins.set": _set,
        "builtins.frozenset": _frozenset,
        "builtins.bytes": _bytes,
        "builtins.bytearray": _bytearray,
        "_codecs.encode": _latin1,
        "numpy.dtype": _np_dtype,
    })
    for mod in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 spellings
        fns.update({f"{mod}.multiarray._reconstruct": _np_reconstruct, f"{mod}.multiarray.scalar": _np_scalar,
                    f"{mod}.numeric._frombuffer": _np_frombuffer})
    for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        fns[f"pathlib.{cls}"] = fns[f"pathlib._local.{cls}"] = _path
    g = {name: _Fn(name, fn) for name, fn in fns.items()}
    tensor_type = _TensorType()
    g.update({"torch.Tensor": tensor_type, "torch.nn.parameter.Parameter": tensor_type,
              "numpy.ndarray": _NumpyType()})
    for name in _DTYPE_NAMES:
        g[f"torch.{name}"] = getattr(torch, name)
    for name, dtype in _STORAGE_DTYPES.items():
        g[f"torch.{name}"] = _StorageType(dtype)
    return g


_ALLOWED = _allowed_globals()


def _normalize(module: str, name: str) -> tuple[str, str]:
    """Python-2 spellings in protocol-2 pickles (``__builtin__``) to Python 3's, as pickle does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _is_standin(module: str, name: str) -> bool:
    qual = f"{module}.{name}"
    if not (name.isidentifier() and all(part.isidentifier() for part in module.split("."))):
        return False
    return module in _STANDIN_MODULES or module.startswith(_STANDIN_PREFIXES) or qual in _STANDIN_CLASSES


def _global_refusal(qual: str) -> str:
    hint = (" (an ultralytics>=8 package checkpoint; only YOLOv5 checkpoints are supported)"
            if qual.startswith("ultralytics.") else "")
    return (f"the pickle references '{_printable(qual)}', which is not allowed in a YOLOv5 checkpoint "
            f"(it could run arbitrary code){hint}")


def _call(func, args):
    """REDUCE: ``func(*args)`` for our functions and stand-in classes only."""
    if type(args) is not tuple:
        raise _Corrupt("call arguments are not a tuple")
    if type(func) is _Fn:
        return func.fn(*args)
    if isinstance(func, type) and issubclass(func, StandIn):
        return func(*args)
    raise _Refused(f"the pickle calls {_describe(func)}, which a checkpoint never does")


def _new(cls, args):
    """NEWOBJ / INST / OBJ: only stand-in classes are instantiated."""
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise _Refused(f"the pickle creates an object of {_describe(cls)}, which a checkpoint never does")
    if type(args) not in (tuple, list):
        raise _Corrupt("constructor arguments are not a tuple")
    return cls(*args)


def _fill_dict(d, items):
    if type(d) not in (dict, collections.OrderedDict):
        raise _Refused(f"the pickle sets items on {_describe(d)} (only dicts take items)")
    if len(items) % 2:
        raise _Corrupt("odd number of dict items")
    for i in range(0, len(items), 2):
        d[_check_key(items[i])] = items[i + 1]


def _list_target(lst):
    if type(lst) is not list:
        raise _Refused(f"the pickle appends to {_describe(lst)} (only lists take items)")
    return lst


class _Unpickler(pickle._Unpickler):
    """Pickle's pure-Python unpickler with our policy for globals, calls, BUILD and containers.

    Globals resolve only from the allowlist, storages via ``load_storage``; every opcode is charged to
    ``budget`` (a one-item list shared by the pickles of one file), which also bounds the time spent.
    """

    def __init__(self, f, load_storage=None, budget=None):
        super().__init__(f, encoding="utf-8")
        self._load_storage = load_storage
        self._budget = [_PICKLE_BUDGET] if budget is None else budget
        self._standins: dict[str, type] = {}  # fresh per file: nothing one file does reaches another

    def _charge(self, cost):
        self._budget[0] -= cost
        if self._budget[0] < 0:
            raise _Refused(f"the pickle builds far more objects than a checkpoint holds (its opcodes "
                           f"would build over {_PICKLE_BUDGET >> 20} MiB)")

    def load(self):
        """pickle's own load loop, with every opcode charged an estimate of what it builds."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read, self.readinto, self.readline = (self._unframer.read, self._unframer.readinto,
                                                   self._unframer.readline)
        self.metastack, self.stack, self.proto = [], [], 0
        self.append = self.stack.append
        read, dispatch, budget = self.read, self.dispatch, self._budget
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                cost = _OP_COSTS.get(key[0])
                if cost is None:
                    raise _Corrupt(f"unknown pickle opcode 0x{key[0]:02x}")
                if budget[0] < cost:
                    self._charge(cost)  # raises
                budget[0] -= cost
                dispatch[key[0]](self)
        except pickle._Stop as stop:
            return stop.value

    def find_class(self, module, name):
        if type(module) is not str or type(name) is not str:
            raise _Corrupt("non-string global name")
        module, name = _normalize(module, name)
        qual = f"{module}.{name}"
        if qual in _ALLOWED:
            return _ALLOWED[qual]
        if _is_standin(module, name):
            if qual not in self._standins:
                self._charge(_NEW_CLASS_COST)
                self._standins[qual] = type(name, (StandIn,), {"qualname": qual, "__module__": __name__,
                                                               "__slots__": ()})
            return self._standins[qual]
        raise _Refused(_global_refusal(qual))

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise _Corrupt("unexpected persistent id")
        return self._load_storage(pid)

    def _instantiate(self, klass, args):  # INST and OBJ
        self.append(_new(klass, args))

    def _op_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = _call(self.stack[-1], args)

    def _op_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = _new(self.stack[-1], args)

    def _op_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        if type(kwargs) is not dict or kwargs:
            raise _Corrupt("unexpected constructor keywords")
        self.stack[-1] = _new(self.stack[-1], args)

    def _op_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        t = type(inst)
        if issubclass(t, StandIn) or t is NumpyDType or t is NumpyArray:
            inst._build(state)
        elif t is collections.OrderedDict and (state is None or type(state) is dict and set(state) <= {"_metadata"}):
            pass  # torch's state_dict version metadata: not needed, dropped
        else:
            raise _Refused(f"unexpected state for {_describe(inst)} (pickle BUILD is only allowed on "
                           f"pickled modules, namespaces, OrderedDicts and numpy values)")

    def _op_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        _fill_dict(self.stack[-1], (key, value))

    def _op_setitems(self):
        items = self.pop_mark()
        _fill_dict(self.stack[-1], items)

    def _op_dict(self):
        items = self.pop_mark()
        d = {}
        _fill_dict(d, items)
        self.append(d)

    def _op_append(self):
        value = self.stack.pop()
        _list_target(self.stack[-1]).append(value)

    def _op_appends(self):
        items = self.pop_mark()
        _list_target(self.stack[-1]).extend(items)

    def _op_additems(self):
        items = self.pop_mark()
        s = self.stack[-1]
        if type(s) is not set:
            raise _Refused(f"the pickle adds set items to {_describe(s)}")
        s.update(_check_key(x) for x in items)

    def _op_frozenset(self):
        self.append(frozenset(_check_key(x) for x in self.pop_mark()))

    def _op_put(self):
        i = int(self.readline()[:-1])
        if not 0 <= i < _MAX_MEMO:
            raise _Corrupt("bad memo index")
        self.memo[i] = self.stack[-1]

    def _op_bytearray8(self):
        # pickle's own version allocates the announced length before reading anything
        (n,) = struct.unpack("<Q", self.read(8))
        data = self.read(n)
        if len(data) != n:
            raise EOFError("pickle data ends inside a bytearray")
        self.append(bytearray(data))


def _dispatch() -> dict:
    """pickle's opcode table with our handlers."""
    U, P = _Unpickler, pickle
    ops = dict(pickle._Unpickler.dispatch)
    ops.update({P.REDUCE[0]: U._op_reduce, P.NEWOBJ[0]: U._op_newobj, P.NEWOBJ_EX[0]: U._op_newobj_ex,
                P.BUILD[0]: U._op_build, P.SETITEM[0]: U._op_setitem, P.SETITEMS[0]: U._op_setitems,
                P.DICT[0]: U._op_dict, P.APPEND[0]: U._op_append, P.APPENDS[0]: U._op_appends,
                P.ADDITEMS[0]: U._op_additems, P.FROZENSET[0]: U._op_frozenset, P.PUT[0]: U._op_put,
                P.BYTEARRAY8[0]: U._op_bytearray8})
    return ops


# Estimated bytes each opcode builds: containers, calls and objects 256 (an empty set alone is 216),
# anything else 64 (a stack slot and a small object; data opcodes' payload is already in memory).
_BIG_OPS = (pickle.EMPTY_DICT, pickle.DICT, pickle.EMPTY_SET, pickle.FROZENSET, pickle.REDUCE, pickle.NEWOBJ,
            pickle.NEWOBJ_EX, pickle.OBJ, pickle.INST, pickle.BUILD, pickle.BINPERSID, pickle.PERSID)
_OP_COSTS = {code: 256 if bytes([code]) in _BIG_OPS else 64 for code in pickle._Unpickler.dispatch}
_Unpickler.dispatch = _dispatch()


class _Bounded:
    """A file whose reads never ask for more than what is left of it (no huge up-front buffers)."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.readline = f.readline

    def read(self, n=-1):
        left = max(self.size - self.f.tell(), 0)
        return self.f.read(left if n is None or n < 0 else min(n, left))


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
    if not (type(pid) is tuple and len(pid) == n and pid[0] in ("storage", b"storage")):
        raise _Corrupt(f"unexpected persistent id ({_describe(pid)})")
    if not isinstance(pid[1], _StorageType):
        raise _Corrupt("storage of an unknown type")
    if type(pid[2]) not in (str, int):
        raise _Corrupt("bad storage key")
    return pid


class _Loaded(NamedTuple):
    """What a torch.save file unpickled to, and how many tensor bytes it stores."""

    obj: object
    stored_bytes: int


def _read_zip(f, file_size: int) -> _Loaded:
    """Unpickle a torch >= 1.6 zip checkpoint (``<dir>/data.pkl`` + ``<dir>/data/<key>``)."""
    zf = zipfile.ZipFile(f)
    names = set(zf.namelist())
    budget = [_ZIP_EXPANSION * file_size + (1 << 20)]  # torch stores records uncompressed

    def read(name):
        budget[0] -= zf.getinfo(name).file_size
        if budget[0] < 0:
            raise _Refused(f"its zip records expand far beyond the file's {file_size:,} bytes (a zip bomb?)")
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
                raise _Corrupt(f"missing storage record data/{_printable(key, 40)}")
            storages[key] = _Storage(_from_bytes(read(record), stype.dtype, big))
        elif storages[key].data.dtype != stype.dtype:
            raise _Corrupt(f"storage record data/{_printable(key, 40)} used with two types")
        return storages[key]

    obj = _Unpickler(io.BytesIO(read(pkl[0])), load).load()
    return _Loaded(obj, sum(s.data.nbytes for s in storages.values()))


def _read_legacy(f, file_size: int) -> _Loaded:
    """Unpickle a pre-1.6 checkpoint: magic, protocol, sys_info, object, storage keys, raw storages."""
    f = _Bounded(f, file_size)
    budget = [_PICKLE_BUDGET]  # shared by the five pickles of the file
    if _Unpickler(f, budget=budget).load() != _LEGACY_MAGIC:
        raise _Corrupt("not a torch.save file (no zip archive, no legacy magic number)")
    if _Unpickler(f, budget=budget).load() != _LEGACY_PROTOCOL:
        raise _Corrupt("unknown legacy protocol version")
    info = _Unpickler(f, budget=budget).load()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise _Corrupt("big-endian legacy checkpoints are not supported")
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}
    left = [file_size]  # every storage's bytes follow in the file

    def load(pid):
        if type(pid) is tuple and pid and pid[0] in ("module", b"module"):
            if len(pid) > 1 and isinstance(pid[1], type) and issubclass(pid[1], StandIn):
                return pid[1]
            raise _Corrupt("unexpected module reference")
        _, stype, key, _location, numel, view = _storage_id(pid, 6)
        key = str(key)
        if key not in roots:
            left[0] -= _check_int(numel, "storage size") * _element_size(stype.dtype)
            if left[0] < 0:
                raise _Corrupt("storages larger than the file")
            roots[key] = _Storage(torch.zeros(numel, dtype=stype.dtype))
        if view is None:
            return roots[key]
        if type(view) is not tuple or len(view) != 3 or type(view[0]) not in (str, int):
            raise _Corrupt("bad storage view")
        vkey, off, n = view
        if str(vkey) not in views:
            lo, n = _check_int(off, "offset"), _check_int(n, "size")
            views[str(vkey)] = _Storage(roots[key].data[lo:lo + n])
        return views[str(vkey)]

    obj = _Unpickler(f, load, budget).load()
    keys = _Unpickler(f, budget=budget).load()
    if type(keys) is not list:
        raise _Corrupt("bad storage key list")
    for key in keys:  # raw bytes follow in this order, each after an int64 element count
        st = roots.get(str(key)) if type(key) in (str, int) else None
        if st is None:
            raise _Corrupt(f"unknown storage key {_shown(key)}")
        head = f.read(8)
        if len(head) < 8:
            raise EOFError("file ends inside the tensor data")
        (numel,) = struct.unpack("<q", head)
        if numel != st.data.numel():
            raise _Corrupt(f"storage {_shown(key)} holds {numel} elements, expected {st.data.numel()}")
        raw = f.read(numel * st.data.element_size())
        if len(raw) < numel * st.data.element_size():
            raise EOFError("file ends inside the tensor data")
        st.data.view(torch.uint8).copy_(_from_bytes(raw, torch.uint8, False))
    return _Loaded(obj, sum(s.data.nbytes for s in roots.values()))


def _error_text(e: BaseException) -> str:
    try:
        text = " ".join(str(e).split())
    except Exception:  # str() of an exception holding file data may fail; its type still says enough
        text = ""
    return _printable(text, 160) or type(e).__name__


def _unpickle(path) -> _Loaded:
    """Unpickle a ``torch.save`` file with the allowlist: stand-ins for modules, tensors on the CPU.

    Reads the zip format (torch >= 1.6) and the legacy format. Raises UserError naming the file for a
    refused global or construct, a truncated or corrupt file, or a file that is not a torch checkpoint.
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
        raise UserError(f"{path}: refused to load: {e.args[0]}") from None
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"{path}: not a readable PyTorch checkpoint (nested too deeply)") from None
    except Exception as e:  # corrupt pickles raise many types; the file is at fault either way
        what = ("truncated or corrupt file" if isinstance(e, (EOFError, zipfile.BadZipFile))
                else "not a readable PyTorch checkpoint")
        raise UserError(f"{path}: {what} ({_error_text(e)})") from None


_SKIP = object()
_DICTS = (dict, collections.OrderedDict)


def _plain(x, budget=None, depth=0):
    """``x`` as plain data (str/int/float/bool/None, lists, dicts); ``_SKIP`` when it is not.

    ``budget`` (a one-item list) caps the items and tensor/array elements visited, so shared or cyclic
    references cannot blow up.
    """
    budget = [_PLAIN_ITEMS] if budget is None else budget
    budget[0] -= 1
    if depth > 16 or budget[0] < 0:
        return _SKIP
    if x is None or type(x) in (bool, int, float, str):
        return x
    if isinstance(x, (TensorRecord, NumpyArray)):
        values = x.tensor if isinstance(x, TensorRecord) else x.array
        n = 0 if values is None else (values.numel() if isinstance(values, torch.Tensor) else values.size)
        budget[0] -= n
        if values is None or n > 1000 or budget[0] < 0:
            return _SKIP
        return _plain(values.tolist(), budget, depth + 1)
    if isinstance(x, StandIn) and x.qualname == "argparse.Namespace":
        x = x.state
    if type(x) in (list, tuple, set, frozenset):
        items = [_plain(v, budget, depth + 1) for v in x]
        return [v for v in items if v is not _SKIP]
    if type(x) in _DICTS:
        out = {}
        for k, v in x.items():
            v = _plain(v, budget, depth + 1)
            if type(k) in (str, int) and v is not _SKIP:
                out[k] = v
        return out
    return _SKIP


def _is_name(k) -> bool:
    """A module, parameter or buffer name torch could have written (no dots, printable)."""
    return type(k) is str and 0 < len(k) <= 128 and "." not in k and k.isprintable()


def _module_parts(m, name, path):
    """The pickled state of module ``m``, checked to hold torch's module dicts keyed by valid names."""
    layer = f"layer '{name or 'model'}'"
    st = m.state if isinstance(m, StandIn) else None
    if type(st) not in _DICTS or not all(type(st.get(k)) in _DICTS for k in _MODULE_DICTS):
        raise UserError(f"{path}: {layer} ({_describe(m)}) is not a pickled torch module")
    for k in _MODULE_DICTS:
        bad = [key for key in st[k] if not _is_name(key)]
        if bad:
            raise UserError(f"{path}: {layer} has an entry {_shown(bad[0])} in {k}, not a valid name")
    for key, child in st["_modules"].items():
        if child is not None and not isinstance(child, StandIn):
            raise UserError(f"{path}: {layer} has a sub-module '{key}' that is {_describe(child)}, not a module")
    return st


def _check_module(m, name, path):
    qual = m.qualname
    if qual not in _SUPPORTED:
        raise UserError(f"{path}: layer '{name}' is {qual}, which compress's YOLOv5 blocks do not implement")
    rule = BY_PICKLED.get(qual)
    problem = rule.check_pickled(m.state, qual) if rule is not None else None
    if problem:
        raise UserError(f"{path}: layer '{name}' {problem}")


class _Copier:
    """Copies tensors out of the file (fp32 for floating point) under one byte budget for the whole file.

    The budget is ``_TENSOR_FACTOR`` x the storage bytes the file holds + ``_TENSOR_SLACK``: an fp16
    checkpoint needs 2x, so only views larger than their data (zero strides) or many views of the same
    data exceed it. A record referenced several times is copied (and charged) once.
    """

    def __init__(self, stored_bytes: int, path):
        self.limit = _TENSOR_FACTOR * stored_bytes + _TENSOR_SLACK
        self.left, self.stored, self.path = self.limit, stored_bytes, path
        self.done: dict[int, tuple] = {}

    def __call__(self, rec: TensorRecord) -> torch.Tensor:
        hit = self.done.get(id(rec))
        if hit is not None:
            return hit[1]
        t = rec.tensor
        self.left -= t.numel() * (4 if t.is_floating_point() else t.element_size())
        if self.left < 0:
            raise UserError(f"{self.path}: refused to load: its tensors would take more than "
                            f"{self.limit / 2**20:.0f} MiB in memory for {self.stored:,} bytes of tensor "
                            f"data in the file (views repeated or larger than their data)")
        out = (t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()).contiguous()
        self.done[id(rec)] = (rec, out)  # holding rec keeps its id unique
        return out


def _collect(m, prefix, out, path, copy, depth=0, visits=None):
    """Fill ``out`` with the module tree's persistent parameters and buffers under dotted names."""
    name = prefix[:-1]
    visits = [0] if visits is None else visits
    visits[0] += 1
    if depth > _MAX_DEPTH or visits[0] > _MAX_MODULES:
        raise UserError(f"{path}: module tree nested too deeply or too large at '{name}'")
    st = _module_parts(m, name, path)
    _check_module(m, name or "model", path)
    skip = st.get("_non_persistent_buffers_set")
    skip = set() if skip is None else skip
    if type(skip) not in (set, frozenset) or not all(type(k) is str for k in skip):
        raise UserError(f"{path}: layer '{name or 'model'}' has a _non_persistent_buffers_set that is "
                        f"{_describe(skip)}, not a set of names")
    tensors = list(st["_parameters"].items()) + [
        (k, v) for k, v in st["_buffers"].items() if k not in skip and k not in _DROPPED_BUFFERS]
    for k, v in tensors:
        if v is None:
            continue
        if not isinstance(v, TensorRecord):
            raise UserError(f"{path}: '{prefix}{k}' is {_describe(v)}, not a tensor")
        if prefix + k in out:
            raise UserError(f"{path}: '{prefix}{k}' is both a parameter and a buffer")
        out[prefix + k] = copy(v)
    rule = BY_PICKLED.get(m.qualname)
    renames = getattr(rule, "pickled_renames", None)
    into = {} if renames else out
    for k, child in st["_modules"].items():
        if child is not None:
            _collect(child, f"{prefix}{k}.", into, path, copy, depth + 1, visits)
    if renames:  # a reference class whose layers sit under other names than our block's (same tensors)
        for key, v in into.items():
            rest = key[len(prefix):]
            new = next((prefix + b + rest[len(a):] for a, b in renames.items() if rest.startswith(a)), key)
            if new in out:
                raise UserError(f"{path}: '{new}' appears twice")
            out[new] = v


def _cfg_numbers_ok(x, depth=0) -> bool:
    """Every int in the YAML is moderate and every float finite (so parsing cannot overflow)."""
    if type(x) is int:
        return abs(x) <= _MAX_CFG_INT
    if type(x) is float:
        return math.isfinite(x) and abs(x) <= _MAX_CFG_INT
    if type(x) is list:
        return depth < 16 and all(_cfg_numbers_ok(v, depth + 1) for v in x)
    if type(x) is dict:
        return depth < 16 and all(_cfg_numbers_ok(v, depth + 1) for v in x.values())
    return True


def _check_cfg(cfg: dict, sd: dict, path) -> None:
    """Refuse an embedded YAML that cannot describe the stored tensors, before anything is built for real.

    Bounds what parsing could allocate (rows, repeats, nc, anchors, numbers), then builds the layers on
    the meta device (no memory) and compares their size with the tensors in the file, so a crafted YAML
    cannot make ``load_model`` build a model far larger than the file.
    """
    where = f"{path}: the embedded model YAML"
    nc = cfg.get("nc")
    if type(nc) is not int or not 0 < nc <= _MAX_NC:
        raise UserError(f"{where} has nc={_shown(nc)} (expected 1 to {_MAX_NC:,} classes)")
    backbone, head = cfg["backbone"], cfg["head"]
    if type(backbone) is not list or type(head) is not list or len(backbone) + len(head) > _MAX_ROWS:
        raise UserError(f"{where} needs 'backbone' and 'head' lists of at most {_MAX_ROWS} rows in all")
    if not _cfg_numbers_ok(cfg):
        raise UserError(f"{where} holds numbers out of range (over {_MAX_CFG_INT:,} or not finite)")
    for key in ("depth_multiple", "width_multiple"):
        x = cfg.get(key, 1.0)
        if type(x) not in (int, float) or not 0 < x <= 16:
            raise UserError(f"{where} has {key}={_shown(x)} (expected a number in (0, 16])")
    gd = cfg.get("depth_multiple", 1.0)
    numbers = [row[1] for row in backbone + head if type(row) is list and len(row) == 4 and type(row[1]) is int]
    if sum(max(round(n * gd), 1) for n in numbers if n > 1) > _MAX_REPEATS:
        raise UserError(f"{where} repeats its blocks more than {_MAX_REPEATS} times in all")
    anchors = cfg.get("anchors")
    if not ((type(anchors) is int and 0 < anchors <= 16)
            or (type(anchors) is list and len(anchors) <= 16
                and all(type(a) is list and len(a) <= 64 for a in anchors))):
        raise UserError(f"{where} has bad anchors (a list of at most 16 anchor levels)")
    specs, _ = parse_cfg(cfg)
    with torch.device("meta"):
        layers, _ = _build_layers(specs)
    want = sum(t.numel() for t in layers.state_dict().values())
    have = sum(t.numel() for t in sd.values())
    if want > have:
        raise UserError(f"{where} describes a model of {want:,} tensor elements, but the file stores "
                        f"only {have:,}; the YAML does not match the checkpoint's weights")


def _names(raw, nc):
    raw = _plain(raw)
    if type(raw) is dict:  # v7+: {0: 'person', ...}
        raw = [raw[k] for k in sorted(raw)] if raw and all(type(k) is int for k in raw) else list(raw.values())
    if type(raw) is list and len(raw) == nc and all(type(x) in (str, int) for x in raw):
        return [str(x) for x in raw]
    return [str(i) for i in range(nc)]


def load_checkpoint(path) -> dict:
    """Read an ultralytics YOLOv5 checkpoint safely (no pickled code is run, memory and time bounded).

    Returns ``{"cfg": dict, "state_dict": {name: tensor}, "names": [str], "meta": dict}``: ``cfg`` is the
    model YAML ultralytics stored in ``model.yaml`` (``nc`` set to the model's), ``state_dict`` fp32
    tensors with ultralytics key names (``ema`` preferred over ``model``, ``anchor_grid`` and
    non-persistent buffers dropped), ``meta`` plain data (epoch, date, stride, opt, ...). Raises UserError
    naming the file for unsafe, corrupt, crafted or non-YOLOv5 files, whatever their structure.
    """
    path = Path(path)
    loaded = _unpickle(path)
    try:
        return _from_tree(loaded, path)
    except UserError:
        raise
    except RecursionError:
        raise UserError(f"{path}: not a readable YOLOv5 checkpoint (nested too deeply)") from None
    except Exception as e:  # the checks in _from_tree should leave nothing, but a file must never crash us
        raise UserError(f"{path}: not a readable YOLOv5 checkpoint (unexpected structure: "
                        f"{_error_text(e)})") from None


def _from_tree(loaded: _Loaded, path) -> dict:
    """:func:`load_checkpoint`'s result from the unpickled object tree."""
    ck = loaded.obj
    if type(ck) not in _DICTS:
        raise UserError(f"{path}: not an ultralytics YOLOv5 checkpoint (holds {_describe(ck)}, expected a "
                        f"dict with a 'model' entry)")
    if ck.get("model") is None and ck.get("ema") is None:
        if ck and all(isinstance(v, TensorRecord) for v in ck.values()) or type(ck.get("state_dict")) in _DICTS:
            raise UserError(f"{path}: a plain state_dict, not an ultralytics checkpoint: pass its model YAML "
                            f"with --cfg")
        keys = ", ".join(_shown(k) for k in list(ck)[:6])
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
    if not (type(cfg) is dict and "backbone" in cfg and "head" in cfg):
        raise UserError(f"{path}: the model has no readable YAML ('yaml' attribute with backbone and head)")
    det_st = _module_parts(detect, f"model.{len(layers) - 1}", path)
    nc = st.get("nc", det_st.get("nc"))
    if type(nc) is int and nc > 0 and nc != cfg.get("nc"):
        cfg["nc"] = nc  # ultralytics overrides the YAML's nc with the dataset's
    cfg["yaml_file"] = f"{path} (embedded model YAML)"  # so YAML errors name the checkpoint

    sd: dict[str, torch.Tensor] = {}
    _collect(root, "", sd, path, _Copier(loaded.stored_bytes, path))
    _check_cfg(cfg, sd, path)
    stride = _plain(st.get("stride", det_st.get("stride")))
    budget = [_PLAIN_ITEMS]  # one budget for all metadata: many keys sharing one big value stay cheap
    meta = {k: v for k, v in ((k, _plain(v, budget)) for k, v in ck.items()
                              if type(k) is str and k not in ("model", "ema", "optimizer"))
            if v is not _SKIP}
    meta.update(source=source, model_class=root.qualname,
                stride=stride if stride is not _SKIP else None)
    names = _names(st.get("names", ck.get("names")), cfg["nc"])
    return {"cfg": cfg, "state_dict": sd, "names": names, "meta": meta}
