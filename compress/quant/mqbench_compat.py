"""Compatibility fixes that make mqbench-torch2 0.1.1 run on torch 2.13 / NumPy 2 / onnx 1.2x.

mqbench-torch2 0.1.1 (the registry's MQBench port) was written against an older torch; on
torch 2.13.0+cpu, numpy 2.4, onnx 1.23 and onnxruntime 1.32 six things break between
``prepare_by_platform`` and ``convert_deploy``. Every fix lives here, is applied from outside the package
(nothing in site-packages is edited) and is installed once by :func:`apply`. Each fix can be removed
again (:func:`revert`, :func:`without`) so the tests can show the failure it prevents.

Fixes, by name:

- ``fuse_fx_qat``: torch's public ``fuse_fx`` always fuses with ``is_qat=False`` -> a train-mode model
  fails with ``AssertionError: Fusion only for eval!``.
- ``symbolic_shapes``: NNIE's and Vitis's custom-op symbolics give their output no type ->
  ``ONNX export of convolution for kernel of unknown shape``.
- ``onnx_export``: MQBench's ``convert_onnx`` uses torch's default (dynamo) exporter, lets torch
  de-duplicate equal parameters, inlines autograd functions and shells out to ``polygraphy``.
- ``numpy2_qparams``: ``float()`` of a one-element 1-D array raises on NumPy 2 -> clip-range export
  fails for per-tensor LSQ scales.
- ``qlinear_toposort``: the Q/DQ (``deploy_to_qlinear``) pass's topological sort treats Resize's empty
  optional input ``''`` as missing -> ``AssertionError: Graph is illegel, error occured!``.
- ``clip_ranges_out2node``: Tengine_u8/STPU call ``post_process_clip_ranges`` without the ``out2node``
  argument it gained -> ``TypeError: ... missing 1 required positional argument: 'out2node'``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import warnings

import torch

FIXES = ("fuse_fx_qat", "symbolic_shapes", "onnx_export", "numpy2_qparams", "qlinear_toposort",
         "clip_ranges_out2node")

_INSTALLERS = {}   # fix name -> function that installs it and returns a function undoing it
_undo = {}         # fix name -> undo function, for the fixes installed now
_suspended = set()  # fixes held off by `without` (apply() leaves them out)


def _fix(name):
    def register(fn):
        _INSTALLERS[name] = fn
        return fn
    return register


def _swap(owner, attr, value):
    """Set ``owner.attr = value`` (a module or class attribute); return a function restoring it."""
    had = attr in vars(owner)
    old = vars(owner).get(attr)
    setattr(owner, attr, value)

    def undo():
        if had:
            setattr(owner, attr, old)
        else:
            delattr(owner, attr)
    return undo


def _chain(*undos):
    def undo():
        for u in reversed(undos):
            u()
    return undo


def apply(names=FIXES) -> None:
    """Install the fixes (all by default). Idempotent: a fix already installed is left as it is."""
    for name in names:
        if name not in _INSTALLERS:
            raise KeyError(f"unknown MQBench fix {name!r} (known: {', '.join(FIXES)})")
        if name not in _undo and name not in _suspended:
            with warnings.catch_warnings():  # MQBench's modules call the deprecated logger.warn on import
                warnings.simplefilter("ignore", DeprecationWarning)
                _undo[name] = _INSTALLERS[name]()


def revert(names=FIXES) -> None:
    """Remove installed fixes (all by default), restoring MQBench's own functions."""
    for name in names:
        undo = _undo.pop(name, None)
        if undo is not None:
            undo()


def applied() -> tuple:
    """Names of the fixes installed now."""
    return tuple(n for n in FIXES if n in _undo)


@contextlib.contextmanager
def without(*names):
    """Run a block with the given fixes removed and held off (``apply()`` inside leaves them out).

    For tests that show the failure a fix prevents; every fix is installed again afterwards.
    """
    apply()
    revert(names)
    _suspended.update(names)
    try:
        yield
    finally:
        _suspended.difference_update(names)
        apply(names)


# 1. Fusion --------------------------------------------------------------------------------------------
# torch 2.x's public fuse_fx(model, fuse_custom_config, backend_config) calls _fuse_fx(..., is_qat=False)
# whatever the model's mode, and fusing a training BatchNorm then raises
# "AssertionError: Fusion only for eval!" in torch.nn.utils.fusion.fuse_conv_bn_eval. MQBench 0.1.1's
# ModelQuantizer.prepare (used by NNIE, Tensorrt, SNPE, PPLW8A16, Tengine_u8, STPU, ONNX_QNN, ...) calls
# that fuse_fx. Fusing with is_qat=True for train-mode models makes Conv+BN a QAT ConvBn2d that trains
# on batch statistics and is folded with running statistics at deploy. The replacement fuses MQBench's
# traced graph as it is: fuse_fx would re-trace it with torch's default tracer, which traces through
# custom leaf modules such as Detect.

def _fuse_fx_by_mode(model, fuse_custom_config=None, backend_config=None):
    from torch.ao.quantization.quantize_fx import _fuse_fx

    is_qat = any(m.training for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    # MQBench passes its own fusion dict here; torch would only read "preserved_attributes" from it.
    return _fuse_fx(model, is_qat, None, backend_config)


@_fix("fuse_fx_qat")
def _install_fuse_fx():
    import mqbench.custom_quantizer.model_quantizer as mq

    return _swap(mq, "fuse_fx", _fuse_fx_by_mode)


# 2. Custom-op symbolics ---------------------------------------------------------------------------
# MQBench 0.1.1's NNIEQuantizeFunc.symbolic (mqbench_custom::NNIEQuantize) and
# FakeQuantizeTqtAffine.symbolic (Vitis) return an op whose output has no type; torch 2.13's legacy
# exporter then cannot export the Conv that consumes a fake-quantized weight:
# "ONNX export of convolution for kernel of unknown shape". A fake quantizer keeps its input's shape and
# dtype, so the output gets the input's type.

def _typed_like_input(symbolic):
    @functools.wraps(symbolic)
    def wrapped(g, x, *args, **kwargs):
        out = symbolic(g, x, *args, **kwargs)
        out.setType(x.type())
        return out
    return wrapped


@_fix("symbolic_shapes")
def _install_symbolics():
    from mqbench.fake_quantize.nnie import NNIEQuantizeFunc
    from mqbench.fake_quantize.tqt import FakeQuantizeTqtAffine

    undos = []
    for fn in (NNIEQuantizeFunc, FakeQuantizeTqtAffine):
        orig = vars(fn)["symbolic"].__func__
        undos.append(_swap(fn, "symbolic", staticmethod(_typed_like_input(orig))))
    return _chain(*undos)


# 3. ONNX export ---------------------------------------------------------------------------------
# MQBench 0.1.1's convert_deploy.convert_onnx calls torch.onnx.export with torch's defaults. On torch 2.13:
# - dynamo=True is the default: it needs onnxscript and ignores MQBench's registered symbolics; MQBench's
#   deploy passes are written for the legacy TorchScript exporter's graphs (dynamo=False).
# - without keep_initializers_as_inputs=True the exporter de-duplicates equal parameters (all the zero
#   points, the equal activation scales of SPPF's chained max-pools) into Identity nodes reading one
#   initializer. MQBench's passes look quantizer parameters up by initializer name and fail
#   ("KeyError: 'model.0.conv.weight_fake_quant.zero_point'"); MQBench's own Identity rewiring in
#   convert_onnx mis-wires them instead (a scale lands in the zero_point slot, then "AssertionError: This
#   pass is only supposed to be used with TensorRT Backend which does not support asymmetric quantization").
# - autograd functions are inlined by default; Vitis's TQT quantizer then fails with
#   "IndexError: Argument passed to at() was not in the map." (autograd_inlining=False).
# - after export, the initializers listed as graph inputs are dropped again: the Q/DQ pass retypes zero
#   points to int8 but not their graph-input entries, and onnxruntime refuses the Q/DQ model ("Type Error:
#   Data in initializer '...zero_point' has element type tensor(int8) but usage of initializer in graph
#   expects tensor(float)"). And every use of a Constant node gets its own copy:
#   MQBench's passes remove a fake quantizer's Constant inputs node by node and fail with
#   "ValueError: remove(x): x not in container" when two quantizers share one.
# - it then runs `polygraphy surgeon sanitize --fold-constants` through os.system whenever polygraphy is
#   on PATH, rewriting the graph the later passes expect (the team saw the Q/DQ pass then fail with
#   "NoneType - NoneType"); results must not depend on PATH, so this export never calls it.

EXPORT_KWARGS = dict(dynamo=False, keep_initializers_as_inputs=True, autograd_inlining=False)
OPSET = 17  # MQBench 0.1.1 exports with opset 17 and registers its symbolics for it


def convert_onnx(model, input_shape_dict, dummy_input, onnx_model_path, **kwargs):
    """Replacement for MQBench's ``convert_onnx`` deploy step (same signature, see the fix notes above)."""
    export_legacy(model, input_shape_dict, dummy_input, onnx_model_path, **kwargs)
    clean_exported_onnx(onnx_model_path)


def export_legacy(model, input_shape_dict, dummy_input, onnx_model_path, **kwargs):
    """``torch.onnx.export`` with the TorchScript exporter and the options MQBench's passes need."""
    input_names = kwargs.get("input_names", [])
    if dummy_input is None:
        device = next(model.parameters()).device
        dummy = {name: torch.rand(shape, device=device) for name, shape in input_shape_dict.items()}
        input_names = list(dummy)
        dummy_input = tuple(dummy.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer warnings
        torch.onnx.export(model, dummy_input, onnx_model_path, input_names=input_names,
                          output_names=kwargs.get("output_names", []), opset_version=OPSET,
                          dynamic_axes=kwargs.get("dynamic_axes", {}), do_constant_folding=False,
                          custom_opsets={"mqbench_custom": OPSET}, **EXPORT_KWARGS)


def clean_exported_onnx(onnx_model_path) -> None:
    """Rewrite an exported file for MQBench's passes: see :func:`drop_initializer_inputs` and
    :func:`unshare_constants`."""
    import onnx

    m = onnx.load(onnx_model_path)
    drop_initializer_inputs(m)
    unshare_constants(m)
    onnx.save(m, onnx_model_path)


def drop_initializer_inputs(model) -> None:
    """Remove graph inputs that are initializers (left by ``keep_initializers_as_inputs=True``)."""
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def unshare_constants(model) -> None:
    """Give every consumer of a ``Constant`` node's output its own copy of that Constant node."""
    graph = model.graph
    const_out = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    seen = {}
    nodes = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name not in const_out:
                continue
            k = seen.get(name, 0)
            seen[name] = k + 1
            if k == 0:
                continue  # the first consumer keeps the original
            twin = copy.deepcopy(const_out[name])
            twin.name = f"{twin.name or name}_copy{k}"
            twin.output[0] = f"{name}_copy{k}"
            node.input[i] = twin.output[0]
            nodes.append(twin)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


@_fix("onnx_export")
def _install_convert_onnx():
    import mqbench.convert_deploy as cd
    from mqbench.utils.registry import BACKEND_DEPLOY_FUNCTION

    orig = cd.convert_onnx
    swapped = []
    for fns in BACKEND_DEPLOY_FUNCTION.values():
        for i, fn in enumerate(fns):
            if fn is orig:
                fns[i] = convert_onnx
                swapped.append((fns, i))

    def undo():
        for fns, i in swapped:
            fns[i] = orig
    return undo


# 4. NumPy 2 ---------------------------------------------------------------------------------------------
# mqbench-torch2 0.1.1's LinearQuantizer_process.parse_qparams (deploy/deploy_linear.py) returns a
# per-tensor LSQ scale and zero point as one-element 1-D arrays; NumPy >= 2 refuses float() of those
# ("TypeError: only 0-dimensional arrays can be converted to Python scalars"), which breaks the clip-range
# export of Tensorrt, SNPE, PPLW8A16, Vitis, PPLCUDA, Tengine_u8 and STPU. Per-tensor qparams become 0-d.

@_fix("numpy2_qparams")
def _install_parse_qparams():
    from mqbench.deploy.deploy_linear import PERTENSOR_FAKEQUANTIZER, LinearQuantizer_process

    orig = vars(LinearQuantizer_process)["parse_qparams"]

    @functools.wraps(orig)
    def parse_qparams(self, node, name2data):
        tensor_name, scale, zero_point, qmin, qmax = orig(self, node, name2data)
        if node.op_type in PERTENSOR_FAKEQUANTIZER:
            scale = scale.reshape(()) if getattr(scale, "size", 0) == 1 else scale
            zero_point = zero_point.reshape(()) if getattr(zero_point, "size", 0) == 1 else zero_point
        return tensor_name, scale, zero_point, qmin, qmax

    return _swap(LinearQuantizer_process, "parse_qparams", parse_qparams)


# 5. Q/DQ topological sort --------------------------------------------------------------------------------
# mqbench-torch2 0.1.1's ONNXGraph.optimize_model (deploy/common.py), run by the Tensorrt deploy_to_qlinear
# pass, orders nodes by waiting for every input name to be produced; the Resize that torch 2.13's exporter
# writes for nn.Upsample has the empty name '' as its unused optional input, which nothing produces ->
# "AssertionError: Graph is illegel, error occured!". A graph input named '' is added for the sort and
# removed afterwards.

@_fix("qlinear_toposort")
def _install_optimize_model():
    import onnx
    from mqbench.deploy.common import ONNXGraph

    orig = vars(ONNXGraph)["optimize_model"]

    @functools.wraps(orig)
    def optimize_model(self):
        inputs = self.model.graph.input
        if any(i.name == "" for i in inputs):
            return orig(self)
        inputs.append(onnx.ValueInfoProto(name=""))
        try:
            return orig(self)
        finally:
            for j in reversed(range(len(inputs))):
                if inputs[j].name == "":
                    del inputs[j]

    return _swap(ONNXGraph, "optimize_model", optimize_model)


# 6. post_process_clip_ranges(out2node) -------------------------------------------------------------------
# LinearQuantizer_process.post_process_clip_ranges(clip_ranges, graph, inp2node, out2node) gained out2node
# in mqbench-torch2 0.1.1, but Tengine_process and STPU_process (deploy_tengine.py, deploy_stpu.py) still
# call it with three arguments -> "TypeError: ... missing 1 required positional argument: 'out2node'".
# out2node defaults to the graph's current output -> node map.

@_fix("clip_ranges_out2node")
def _install_post_process_clip_ranges():
    from mqbench.deploy.common import update_inp2node_out2node
    from mqbench.deploy.deploy_linear import LinearQuantizer_process

    orig = vars(LinearQuantizer_process)["post_process_clip_ranges"]

    @functools.wraps(orig)
    def post_process_clip_ranges(self, clip_ranges, graph, inp2node, out2node=None):
        if out2node is None:
            out2node = update_inp2node_out2node(graph)[0]
        return orig(self, clip_ranges, graph, inp2node, out2node)

    return _swap(LinearQuantizer_process, "post_process_clip_ranges", post_process_clip_ranges)
