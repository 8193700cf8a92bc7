"""Crafted checkpoints against the restricted unpickler: every one is a clean error, fast and small.

Each case is a file made here from hand-written pickle opcodes (a tiny assembler below) or from
``pickle.dumps`` of helper objects, wrapped in a torch.save-style zip where torch would write one. All
files are then run through ``python -m compress.cli info --weights F`` in a child process, which must
exit 2 with exactly one line on stderr naming the file, in under 2 s of CPU, with a peak RSS under 400 MB,
and without side effects (no marker file from a payload).

To keep the file fast, one runner process imports compress (torch) once and forks a child per case; the
child runs ``compress.cli`` as ``__main__`` exactly as ``python -m`` does, and the runner takes the
child's CPU time (user + system: the work done, whatever else shares the machine) and ``ru_maxrss`` from
``os.wait4``. Import time is therefore not part of a case's time. A forked child does not inherit the peak its parent reached while importing torch, so the RSS
limit is checked on the child's peak plus that difference, measured as the peak of a genuinely fresh
``python -m compress.cli`` process (run on one case, after the runner) minus the forked baseline case.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_SECONDS, MAX_RSS_MB = 2.0, 400

# ---------------------------------------------------------------- a tiny pickle assembler (protocol 2)


class G:
    """A global reference (GLOBAL 'module name')."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Call:
    """``fn(*args)`` (REDUCE)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args


class New:
    """``cls.__new__(cls, *args)`` (NEWOBJ), what pickle writes for an nn.Module."""

    def __init__(self, cls, *args):
        self.cls, self.args = cls, args


class Build:
    """``obj`` then ``state`` then BUILD (``obj.__setstate__(state)``)."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class ODict:
    """``collections.OrderedDict()`` filled with SETITEMS, as torch writes module dicts."""

    def __init__(self, items=None):
        self.items = dict(items or {})


class Pid:
    """A persistent id (BINPERSID): how torch.save refers to a storage record."""

    def __init__(self, *pid):
        self.pid = pid


class Memo:
    """``value``, remembered under ``key`` (LONG_BINPUT)."""

    def __init__(self, key, value):
        self.key, self.value = key, value


class Ref:
    """The value remembered under ``key`` (LONG_BINGET): a second reference to the same object."""

    def __init__(self, key):
        self.key = key


class Raw:
    """Opcodes spliced in as they are."""

    def __init__(self, data: bytes):
        self.data = data


def enc(x) -> bytes:
    """Protocol-2 opcodes that push ``x`` (plain values and the node classes above)."""
    if isinstance(x, Raw):
        return x.data
    if x is None:
        return b"N"
    if isinstance(x, bool):
        return b"\x88" if x else b"\x89"
    if isinstance(x, int):
        if 0 <= x < 256:
            return b"K" + bytes([x])
        if -(2**31) <= x < 2**31:
            return b"J" + struct.pack("<i", x)
        data = pickle.encode_long(x)
        return b"\x8a" + bytes([len(data)]) + data
    if isinstance(x, float):
        return b"G" + struct.pack(">d", x)
    if isinstance(x, str):
        data = x.encode()
        return b"X" + struct.pack("<I", len(data)) + data
    if isinstance(x, bytes):  # protocol 2 spells bytes as _codecs.encode(str, 'latin1'), as torch.save does
        return enc(Call(G("_codecs", "encode"), x.decode("latin1"), "latin1"))
    if isinstance(x, tuple):
        body = b"".join(map(enc, x))
        return body + (b")", b"\x85", b"\x86", b"\x87")[len(x)] if len(x) <= 3 else b"(" + body + b"t"
    if isinstance(x, list):
        return b"]" + (b"(" + b"".join(map(enc, x)) + b"e" if x else b"")
    if isinstance(x, dict):
        return b"}" + _setitems(x)
    if isinstance(x, G):
        return f"c{x.module}\n{x.name}\n".encode()
    if isinstance(x, Call):
        return enc(x.fn) + enc(tuple(x.args)) + b"R"
    if isinstance(x, New):
        return enc(x.cls) + enc(tuple(x.args)) + b"\x81"
    if isinstance(x, Build):
        return enc(x.obj) + enc(x.state) + b"b"
    if isinstance(x, ODict):
        return enc(Call(G("collections", "OrderedDict"))) + _setitems(x.items)
    if isinstance(x, Pid):
        return enc(tuple(x.pid)) + b"Q"
    if isinstance(x, Memo):
        return enc(x.value) + b"r" + struct.pack("<I", x.key)
    if isinstance(x, Ref):
        return b"j" + struct.pack("<I", x.key)
    raise TypeError(type(x))


def _setitems(d: dict) -> bytes:
    return b"(" + b"".join(enc(k) + enc(v) for k, v in d.items()) + b"u" if d else b""


def pkl(x, proto=2) -> bytes:
    return bytes([0x80, proto]) + enc(x) + b"."


def torch_zip(path: Path, data_pkl: bytes, records=None) -> Path:
    """A torch.save-style zip: ``archive/data.pkl``, ``archive/data/<key>`` records, ``archive/version``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def module(qual, modules=None, params=None, buffers=None, **attrs):
    """A pickled nn.Module of class ``qual``: NEWOBJ, then BUILD with torch's module dicts."""
    mod, _, cls = qual.rpartition(".")
    state = {"training": False, "_parameters": _odict(params), "_buffers": _odict(buffers),
             "_non_persistent_buffers_set": Call(G("builtins", "set"), []), "_modules": _odict(modules)}
    state.update(attrs)
    return Build(New(G(mod, cls)), state)


def _odict(x):
    return x if isinstance(x, (Build, Raw, ODict)) else ODict(x)


def tensor(key="0", numel=4, size=(4,), stride=(1,), offset=0, storage=None):
    """``torch._utils._rebuild_tensor_v2`` of the storage record ``key``, as torch.save writes a tensor."""
    storage = Pid("storage", G("torch", "FloatStorage"), key, "cpu", numel) if storage is None else storage
    rebuild = G("torch._utils", "_rebuild_tensor_v2")
    return Call(rebuild, storage, offset, tuple(size), tuple(stride), False, ODict())


def yolo(root_params=None, yaml=None, detect=None, root_modules=None, **root_attrs):
    """The smallest tree load_checkpoint walks: models.yolo.Model > Sequential > Detect."""
    det = detect if detect is not None else module("models.yolo.Detect")
    seq = module("torch.nn.modules.container.Sequential", modules={"0": det})
    attrs = {"yaml": {"backbone": [], "head": []} if yaml is None else yaml, **root_attrs}
    root = module("models.yolo.Model", modules=root_modules or {"model": seq}, params=root_params, **attrs)
    return {"epoch": -1, "model": root, "ema": None}


def numpy_dtype(code, state=(3, "<", None, None, None, -1, -1, 0)):
    return Build(Call(G("numpy", "dtype"), code, False, True), state)


def numpy_array(shape, dtype, raw):
    new = Call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), (0,), b"b")
    return Build(new, (1, tuple(shape), dtype, False, raw))


class _Call:
    """Pickles (with pickle.dumps) as a call of ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ---------------------------------------------------------------- the cases

CASES = {}  # name -> (builder(dir) -> path, regex the error must match)


def case(expect):
    def register(fn):
        CASES[fn.__name__.removeprefix("case_")] = (fn, expect)
        return fn
    return register


@case("no such")
def case_baseline_missing_file(d):
    return d / "does-not-exist.pt"  # the floor: start-up and a one-line error, nothing read


@case("refused to load.*posix.system")
def case_posix_system(d):
    return torch_zip(d / "posix_system.pt", pickle.dumps({"model": _Call(os.system, f"touch {d / 'MARKER'}")}, 2))


@case("refused to load.*builtins.eval")
def case_builtins_eval(d):
    code = f"open({str(d / 'MARKER')!r}, 'w').close()"
    return torch_zip(d / "eval.pt", pickle.dumps({"model": _Call(eval, code)}, 2))


@case("refused to load.*builtins.getattr")
def case_builtins_getattr(d):
    system = Call(G("builtins", "getattr"), Call(G("builtins", "__import__"), "os"), "system")
    return torch_zip(d / "getattr.pt", pkl({"model": Call(system, f"touch {d / 'MARKER'}")}))


@case("refused to load.*subprocess.Popen")
def case_subprocess_popen(d):
    payload = _Call(subprocess.Popen, ["touch", str(d / "MARKER")])
    return torch_zip(d / "popen.pt", pickle.dumps({"model": payload}, 2))


@case("refused to load.*one line")
def case_global_with_newline(d):
    # STACK_GLOBAL (protocol 4) can name a "module" with a newline in it; the message must stay one line
    mod, name = "torch.nn.modules.x\none line".encode(), b"Evil"
    data = (b"\x80\x04}\x8c\x05model" + b"\x8c" + bytes([len(mod)]) + mod + b"\x8c" + bytes([len(name)]) + name
            + b"\x93)\x81s.")
    return torch_zip(d / "newline.pt", data)


@case("unexpected state for a tensor")
def case_tensor_build(d):
    evil = Build(tensor(), (0, 0, (100,), (1,)))  # would reach Tensor.__setstate__ -> set_() with our sizes
    return torch_zip(d / "tensor_build.pt", pkl(yolo(root_params={"w": evil})), {"0": bytes(16)})


@case("bad tensor size")
def case_tensor_negative_size(d):
    return torch_zip(d / "neg_size.pt", pkl(yolo(root_params={"w": tensor(size=(-4,))})), {"0": bytes(16)})


@case("bad tensor stride")
def case_tensor_negative_stride(d):
    return torch_zip(d / "neg_stride.pt", pkl(yolo(root_params={"w": tensor(stride=(-1,))})), {"0": bytes(16)})


@case("bad tensor size")
def case_tensor_huge_size(d):
    return torch_zip(d / "huge_size.pt", pkl(yolo(root_params={"w": tensor(size=(2**63,), stride=(0,))})),
                     {"0": bytes(16)})


@case("far larger than its storage")
def case_tensor_huge_view(d):
    w = tensor(size=(2**30, 2**30), stride=(0, 0))
    return torch_zip(d / "huge_view.pt", pkl(yolo(root_params={"w": w})), {"0": bytes(16)})


@case("past its storage")
def case_tensor_huge_offset(d):
    return torch_zip(d / "huge_offset.pt", pkl(yolo(root_params={"w": tensor(offset=2**40)})), {"0": bytes(16)})


@case("tensor without a storage")
def case_tensor_storage_is_a_str(d):
    return torch_zip(d / "storage_str.pt", pkl(yolo(root_params={"w": tensor(storage="0")})))


@case("tensor without a storage")
def case_tensor_storage_is_a_type(d):
    w = tensor(storage=G("torch", "FloatStorage"))
    return torch_zip(d / "storage_type.pt", pkl(yolo(root_params={"w": w})))


@case("refused to load.*zip bomb")
def case_zip_bomb(d):
    path = d / "zip_bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pkl(yolo(root_params={"w": tensor(numel=16 << 20, size=(16 << 20,))})))
        with z.open("archive/data/0", "w", force_zip64=True) as w:  # 64 MiB of zeros in ~64 kB
            block = bytes(1 << 20)
            for _ in range(64):
                w.write(block)
    return path


@case("storages larger than the file")
def case_legacy_huge_storage(d):
    path = d / "legacy_huge.pt"
    head = b"".join(pickle.dumps(x, 2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    w = Call(G("torch._utils", "_rebuild_tensor_v2"),
             Pid("storage", G("torch", "FloatStorage"), "0", "cpu", 10**12, None), 0, (4,), (1,), False, ODict())
    path.write_bytes(head + pkl(yolo(root_params={"w": w})) + pickle.dumps(["0"], 2))
    return path


@case("refused to load.*numpy dtype 'V8'")
def case_numpy_dtype_build_segfault(d):
    # A structured dtype with one u8 field, an array of it full of 0x41 bytes, then BUILD on the shared
    # dtype turning the field into an object pointer: .tolist() on the array used to dereference
    # 0x4141414141414141 (SIGSEGV, exit 139).
    u8 = Memo(10, numpy_dtype("u8"))
    rec = Memo(11, numpy_dtype("V8", (3, "|", None, ("f0",), {"f0": (u8, 0)}, 8, 1, 16)))
    arr = numpy_array((4,), rec, b"A" * 32)
    obj = numpy_dtype("O8", (3, "|", None, None, None, -1, -1, 63))
    rebuild = Build(Ref(11), (3, "|", None, ("f0",), {"f0": (obj, 0)}, 8, 1, 27))
    return torch_zip(d / "numpy_segv.pt", pkl(yolo(yaml={"backbone": [], "head": [], "a": arr, "b": rebuild})))


@case("refused to load.*numpy dtype")
def case_numpy_dtype_rebuilt_after_use(d):
    u8 = Memo(10, numpy_dtype("u8"))
    arr = numpy_array((4,), u8, b"A" * 32)
    again = Build(Ref(10), (3, ">", None, None, None, -1, -1, 0))  # even a plain state: never after use
    return torch_zip(d / "numpy_rebuild.pt", pkl(yolo(yaml={"backbone": [], "head": [], "a": arr, "b": again})))


@case("refused to load.*numpy.ndarray directly")
def case_numpy_ndarray_object_call(d):
    # 32 bytes: numpy.ndarray((200_000_000,), 'O'): 1.6 GB of object pointers before any check
    path = d / "ndarray_object.pt"
    path.write_bytes(b"\x80\x02cnumpy\nndarray\nJ\x00\xc2\xeb\x0b\x85X\x01\x00\x00\x00O\x86R.")
    assert path.stat().st_size == 32
    return path


@case("refused to load.*numpy dtype 'O8'")
def case_numpy_object_array(d):
    obj = numpy_dtype("O8", (3, "|", None, None, None, -1, -1, 63))
    arr = Build(Call(G("numpy._core.multiarray", "_reconstruct"), G("numpy", "ndarray"), (0,), b"b"),
                (1, (200_000_000,), obj, False, []))
    return torch_zip(d / "numpy_object.pt", pkl({"epoch": arr, "model": None}))


@case("numpy array of shape")
def case_numpy_shape_beyond_data(d):
    arr = numpy_array((10**12,), numpy_dtype("f8"), b"\0" * 8)
    return torch_zip(d / "numpy_shape.pt", pkl({"best_fitness": arr, "model": None}))


@case("refused to load.*tensors would take")
def case_zero_stride_view_32_references(d):
    # one zero-stride view of 16.7M elements over a 4-byte storage, referenced by 32 parameters: 2.9 kB
    # of file, 2.1 GB if every reference is copied out
    view = tensor(numel=1, size=(4096, 4096), stride=(0, 0))
    params = {f"p{i}": Memo(1, view) if i == 0 else Ref(1) for i in range(32)}
    return torch_zip(d / "zero_stride_refs.pt", pkl(yolo(root_params=params)), {"0": bytes(4)})


@case("refused to load.*tensors would take")
def case_zero_stride_view_32_rebuilds(d):
    params = {f"p{i}": tensor(numel=1, size=(4096, 4096), stride=(0, 0)) for i in range(32)}
    return torch_zip(d / "zero_stride_views.pt", pkl(yolo(root_params=params)), {"0": bytes(4)})


@case("refused to load.*unexpected state for an OrderedDict")
def case_ordereddict_build_shadows_methods(d):
    # BUILD on an OrderedDict would put 'get'/'items' in its instance dict, shadowing the methods
    mods = Build(ODict({"model": module("torch.nn.modules.container.Sequential")}), {"get": 1, "items": 1})
    return torch_zip(d / "odict_build.pt", pkl(yolo(root_modules=mods)))


@case("refused to load.*unexpected state for an OrderedDict")
def case_ordereddict_build_slotstate(d):
    evil = Build(ODict(), (None, {"__class__": G("collections", "OrderedDict"), "keys": 0}))
    return torch_zip(d / "odict_slots.pt", pkl(yolo(root_params=evil)))


@case("not a valid name")
def case_parameter_with_int_key(d):
    return torch_zip(d / "int_key.pt", pkl(yolo(root_params={1: tensor()})), {"0": bytes(16)})


@case("_non_persistent_buffers_set")
def case_non_persistent_set_is_an_int(d):
    det = module("models.yolo.Detect", buffers={"b": tensor()}, _non_persistent_buffers_set=5)
    return torch_zip(d / "np_set.pt", pkl(yolo(detect=det)), {"0": bytes(16)})


@case("is a str, not a module")
def case_submodule_is_a_str(d):
    det = module("models.yolo.Detect", modules={"m": "not a module"})
    return torch_zip(d / "submodule_str.pt", pkl(yolo(detect=det)))


@case("is not a pickled torch module")
def case_module_state_is_a_list(d):
    det = Build(New(G("models.yolo", "Detect")), [1, 2, 3])
    return torch_zip(d / "state_list.pt", pkl(yolo(detect=det)))


@case("nc=1000000000")
def case_huge_nc(d):
    # nc=10**9 with no names list made 10**9 class-name strings
    return torch_zip(d / "huge_nc.pt", pkl(yolo(nc=10**9)))


@case("describes a model of")
def case_yaml_describes_huge_model(d):
    # a YAML of 4096-wide convs: load_model would allocate ~1.8 GB before comparing with the tensors
    yaml = {"nc": 1, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30, 33, 23]],
            "backbone": [[-1, 1, "Conv", [4096, 3]]] * 4, "head": [[[3], 1, "Detect", ["nc", "anchors"]]]}
    return torch_zip(d / "huge_yaml.pt", pkl(yolo(yaml=yaml)))


@case("refused to load.*dict key")
def case_colliding_int_keys(d):
    # 50k ints with one hash: building the dict is quadratic (minutes) in a plain unpickler
    keys = b"".join(enc(k * (2**61 - 1)) + b"N" for k in range(1, 50_001))
    return torch_zip(d / "hash_flood.pt", pkl({"model": None, "x": Raw(b"}(" + keys + b"u")}))


@case("refused to load.*far more objects")
def case_empty_set_flood(d):
    # 1M EMPTY_SET opcodes: 1 MB of pickle, 216 MB of sets
    return torch_zip(d / "set_flood.pt", b"\x80\x04](" + b"\x8f" * 1_000_000 + b"e.")


@case("ends inside a bytearray")
def case_bytearray8_huge_length(d):
    # BYTEARRAY8 announcing 1 TB: pickle's own unpickler allocates it before reading
    return torch_zip(d / "bytearray8.pt", b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"xx.")


@case("nested too deeply|holds a list|not a YOLOv5 detection model")
def case_deeply_nested_lists(d):
    n = 100_000
    return torch_zip(d / "nested_lists.pt", b"\x80\x02}X\x05\x00\x00\x00model" + b"]" * n + b"a" * (n - 1) + b"s.")


@case("nested too deeply")
def case_deeply_nested_modules(d):
    # a chain of 5000 Sequentials, written iteratively (the assembler above would recurse)
    seq = enc(G("torch.nn.modules.container", "Sequential")) + b")\x81"
    empty = b"".join(enc(k) + b"}" for k in ("_parameters", "_buffers"))
    open_level = seq + b"}(" + empty + enc("_modules") + b"}" + enc("0")
    chain = open_level * 5000 + b"N" + b"sub" * 5000  # SETITEM child, SETITEMS state, BUILD
    det = enc(module("models.yolo.Detect"))
    model_seq = (seq + b"}(" + empty + enc("_modules") + b"}(" + enc("0") + chain + enc("1") + det + b"uub")
    root = (enc(G("models.yolo", "Model")) + b")\x81}(" + empty + enc("_modules") + b"}" + enc("model")
            + model_seq + b"s" + enc("yaml") + enc({"backbone": [], "head": []}) + b"ub")
    return torch_zip(d / "nested_modules.pt", b"\x80\x02}" + enc("model") + root + b"s.")


# ---------------------------------------------------------------- running them

RUNNER = textwrap.dedent(r'''
    """For each file: fork, run `python -m compress.cli info --weights FILE` in the child, report JSON."""
    import json, os, resource, runpy, signal, sys, time, traceback

    import compress.cli

    compress.cli.build_parser()  # import every command module before the first fork
    for path in sys.argv[1:]:
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a regression that hangs is killed, not waited for
            # Safety net for this machine: 8 GiB more address space than now; a regression that really
            # uses memory still shows in ru_maxrss long before this.
            vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (vm + (8 << 30), resource.RLIM_INFINITY))
            err = os.open(path + ".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(err, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = ["compress", "info", "--weights", path]
            sys.modules.pop("compress.cli")  # run it afresh as __main__, like python -m
            code = 0
            try:
                runpy.run_module("compress.cli", run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stderr.flush()
            os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({"path": path, "exit": os.waitstatus_to_exitcode(status),
                          "wall": time.perf_counter() - t0, "seconds": usage.ru_utime + usage.ru_stime,
                          "maxrss_mb": usage.ru_maxrss / 1024}),
              flush=True)
''')


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONHASHSEED", None)  # str hashes stay randomised, as for a user
    return env


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Build every case's file, run them all through the CLI, and return ``{name: result}``."""
    d = tmp_path_factory.mktemp("crafted")
    files = {name: build(d) for name, (build, _) in CASES.items()}
    proc = subprocess.run([sys.executable, "-c", RUNNER, *map(str, files.values())], cwd=d, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # after the runner, so that both measure a warm bytecode cache (compiling the package's modules on
    # first import costs tens of MB that a user's installed copy never pays)
    fresh = _start_fresh(files["numpy_dtype_build_segfault"], d)
    by_path = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines())}
    results = {}
    for name, path in files.items():
        r = by_path[str(path)]
        r["stderr"] = Path(f"{path}.stderr").read_text()
        r["size"] = path.stat().st_size if path.exists() else 0
        results[name] = r
    results["__fresh__"] = _finish_fresh(fresh)
    results["__dir__"] = d
    print("\n" + "\n".join(f"{n:40s} exit {r['exit']}  {r['seconds']:.3f} s  {r['maxrss_mb']:.0f} MB  "
                           f"({r['size']:,} bytes)" for n, r in results.items() if not n.startswith("__")))
    r = results["__fresh__"]
    print(f"{'fresh process, numpy_dtype_build_segfault':40s} exit {r['exit']}  {r['seconds']:.3f} s  "
          f"{r['maxrss_mb']:.0f} MB (import of torch included)")
    return results


# Linux counts a child's peak RSS from the fork on, before its exec: a child forked from this (large) pytest
# process would report pytest's size. A small launcher process forks the real one instead.
LAUNCHER = textwrap.dedent(r'''
    import json, os, resource, subprocess, sys, time
    t0 = time.perf_counter()
    with open(sys.argv[1], "w") as err:
        rc = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=err).returncode
    print(json.dumps({"exit": rc, "seconds": time.perf_counter() - t0,
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
''')


def _start_fresh(path, d):
    """``python -m compress.cli info --weights path`` in a new interpreter (not forked), started now."""
    cmd = [sys.executable, "-c", LAUNCHER, str(d / "fresh.stderr"), sys.executable, "-m", "compress.cli", "info",
           "--weights", str(path)]
    return subprocess.Popen(cmd, cwd=d, env=_env(), stdout=subprocess.PIPE, text=True), path, d


def _finish_fresh(fresh):
    p, path, d = fresh
    out, _ = p.communicate(timeout=300)
    r = json.loads(out.strip().splitlines()[-1])
    r.update(path=str(path), stderr=(d / "fresh.stderr").read_text())
    return r


def _check_one_line(r, expect):
    """Exit 2 and exactly one stderr line, the CLI's error line, naming the file and matching ``expect``."""
    lines = r["stderr"].splitlines()
    assert r["exit"] == 2, f"exit {r['exit']}: {r['stderr'][-2000:]}"
    assert len(lines) == 1, r["stderr"][-2000:]
    assert lines[0].startswith("compress info: error: ") and r["path"] in lines[0], lines[0]
    assert re.search(expect, lines[0]), lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_crafted_checkpoint_is_a_clean_error(crafted, name):
    r = crafted[name]
    _check_one_line(r, CASES[name][1])
    # CPU seconds of the child (user + system), not wall time: bounded work, whatever else runs on the machine
    assert r["seconds"] < MAX_SECONDS, f"{name}: {r['seconds']:.2f} s of CPU"
    import_peak = max(crafted["__fresh__"]["maxrss_mb"] - crafted["baseline_missing_file"]["maxrss_mb"], 0)
    assert r["maxrss_mb"] + import_peak < MAX_RSS_MB, (
        f"{name}: peak RSS {r['maxrss_mb']:.0f} MB forked, about {r['maxrss_mb'] + import_peak:.0f} MB fresh")
    assert not (crafted["__dir__"] / "MARKER").exists(), "a payload ran"


def test_fresh_cli_process_on_the_segfault_file(crafted):
    # the real entry point, in an interpreter of its own (its time is mostly importing torch)
    r = crafted["__fresh__"]
    _check_one_line(r, "refused to load")
    assert r["maxrss_mb"] < MAX_RSS_MB, f"peak RSS {r['maxrss_mb']:.0f} MB"

