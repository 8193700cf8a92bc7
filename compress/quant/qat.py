"""Quantization-aware training core: prepare a YOLOv5 model with MQBench, calibrate, save/resume.

The prepared model is an ``torch.fx.GraphModule`` whose Detect head is kept as a leaf module, so it
behaves like the float model: raw per-level outputs in train mode, ``(decoded, raw)`` in eval mode. The
same loss and validator therefore run on it. Typical use by the trainer::

    prepared = prepare_qat(model, "Tensorrt")   # train mode, fake quantizers inserted
    calibrate(prepared, first_batches)          # observers -> initial ranges, then fake quant on
    mark_no_decay(prepared)                     # then build the optimizer: no weight decay on scales
    ... train with the same loss; validate with the same validator (eval output is decoded) ...
    save_qat_state(prepared, "last_qat.pt")     # resume: load_qat_state(prepare_qat(model, ...), path)
    deployment.deploy(prepared, "Tensorrt", out_dir, imgsz)
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from mqbench.utils.logger import set_log_level

from ..errors import UserError
from ..fileio import load_tensors, save_torch
from ..model.blocks import Detect
from ..model.yolo import detect_head
from . import mqbench_compat
from .backends import BACKENDS, Backend, resolve_backend  # noqa: F401  (re-exported)

set_log_level(logging.ERROR)  # before MQBench's other modules: it logs every quantizer at INFO on stdout
import mqbench.prepare_by_platform as pbp  # noqa: E402
from mqbench.utils.state import enable_calibration, enable_quantization  # noqa: E402

# Attributes of the float model that the engine reads and that tracing does not keep.
_KEPT_ATTRS = ("names", "nc", "yaml", "stride")
# Substrings of state_dict keys that only a quantized (prepared) model has.
_QUANT_KEY_MARKERS = ("weight_fake_quant.", "_post_act_fake_quantizer", "activation_post_process.")


def is_quantized_state(state_dict) -> bool:
    """True if a state_dict holds fake-quantizer entries (it comes from a QAT-prepared model)."""
    return any(any(s in k for s in _QUANT_KEY_MARKERS) for k in state_dict)


def check_float_weights(state_dict, source) -> None:
    """Raise UserError if ``state_dict`` (read from ``source``) is already quantized.

    QAT starts from float weights; a QAT state is resumed with :func:`load_qat_state` instead.
    """
    if is_quantized_state(state_dict):
        key = next(k for k in state_dict if any(s in k for s in _QUANT_KEY_MARKERS))
        raise UserError(f"{source}: already-quantized weights (found '{key}'); QAT needs float weights "
                        "(resume a QAT run from its QAT state instead)")


class _NamingTracer(pbp.CustomedTracer):
    """MQBench's tracer, remembering which module a tracing failure came from."""

    def __init__(self, leaf_modules):
        super().__init__(customed_leaf_module=tuple(leaf_modules))
        self.failed_in = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module fails first
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def _trace_check(model, leaf_modules):
    """Trace ``model`` as MQBench will; return ``(Detect node's name, graph)``. UserError naming a failing
    module."""
    tracer = _NamingTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if tracer.failed_in:
            where, cls = tracer.failed_in
            raise UserError(f"layer '{where}' ({cls}) cannot be traced for QAT ({msg}); make it a leaf module "
                            f"(prepare_qat(..., leaf_modules=[{cls}])) or remove data-dependent Python "
                            "control flow from its forward") from None
        raise UserError(f"{type(model).__name__} cannot be traced for QAT ({msg})") from None
    det_path = next(n for n, m in model.named_modules() if isinstance(m, Detect))
    names = [n.name for n in graph.nodes if n.op == "call_module" and n.target == det_path]
    if not names:
        raise UserError(f"{type(model).__name__}: Detect head '{det_path}' does not appear in the traced graph")
    return names[0], graph


def _fused_bn_names(graph, model) -> dict:
    """``{BatchNorm module name: conv module name}`` for every BN that MQBench's fusion folds into the conv
    feeding it (a Conv2d call whose only user is the BN call in the traced ``graph`` of ``model``), whatever
    the blocks call them (``X.conv``/``X.bn`` in YOLOv5's Conv, ``X.conv.0``/``X.conv.1`` in a Sequential)."""
    mods = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(mods.get(src.target), nn.Conv2d) and len(src.users) == 1):
            pairs[node.target] = src.target
    return pairs


def prepare_qat(model: nn.Module, backend: str | Backend, leaf_modules=()) -> torch.fx.GraphModule:
    """Insert MQBench fake quantizers for ``backend`` into a copy of a float YOLOv5 model.

    The Detect head (and any ``leaf_modules`` types) stays a leaf of the traced graph: its 1x1 convs still
    get fake-quantized weights and its inputs fake-quantized activations, and it keeps its train/eval
    behaviour. Conv+BN pairs become QAT ConvBn modules. Returns the prepared model in train mode, with
    ``names``, ``nc``, ``yaml``, ``stride``, ``qat_backend`` (the backend's name) and ``fused_bn`` (which
    BatchNorm was folded into which conv) attributes. ``model`` is not modified.
    """
    backend = resolve_backend(backend)
    if any(isinstance(m, torch.ao.quantization.FakeQuantizeBase) for m in model.modules()):
        raise UserError(f"{type(model).__name__}: the model is already QAT-prepared (has fake quantizers)")
    detect_head(model)
    mqbench_compat.apply()
    float_model = copy.deepcopy(model).train()  # MQBench swaps modules in place
    leaves = (Detect, *leaf_modules)
    det_node, graph = _trace_check(float_model, leaves)
    fused_bn = _fused_bn_names(graph, float_model)
    # The Detect node is named (not given by type) so that backends quantizing layer *outputs* only
    # quantize its inputs: its output is a tuple/list, not a tensor.
    config = {
        "leaf_module": list(leaves),
        "extra_quantizer_dict": {"additional_node_name": [det_node]},
    }
    if backend.exclude_output:
        config["extra_quantizer_dict"]["exclude_node_name"] = ["output"]  # it would quantize the outputs
    try:
        prepared = pbp.prepare_by_platform(float_model, pbp.BackendType[backend.name], config)
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RuntimeError(f"MQBench could not prepare {type(model).__name__} for {backend.name}: {msg}") from e
    if backend.typed_leaf_weights:
        _set_leaf_weight_types(prepared)
    for attr in _KEPT_ATTRS:
        if hasattr(model, attr):
            setattr(prepared, attr, copy.deepcopy(getattr(model, attr)))
    prepared.qat_backend = backend.name
    prepared.fused_bn = fused_bn
    return prepared.to(_device(model)).train()


def _set_leaf_weight_types(prepared):
    # Vitis's quantizer assigns each TQT quantizer its type from graph nodes; the convs inside the Detect
    # leaf are not nodes, so their weight quantizers would stay untyped and fail on the first forward.
    from mqbench.fake_quantize.tqt import TqtFakeQuantize

    for name, m in prepared.named_modules():
        if isinstance(m, TqtFakeQuantize) and m.quant_type is None and name.endswith("weight_fake_quant"):
            m.set_quant_type("param")


def _images(batch, device):
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"calibration batch must be an image tensor or (images, ...), got {type(x).__name__}")
    x = x.to(device)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def calibrate(prepared, batches, max_batches: int | None = None) -> int:
    """Set initial quantization ranges from image batches, then turn fake quantization on.

    Runs in eval mode (BatchNorm running statistics untouched) with observers on and fake quantization
    off, then enables fake quantization (NNIE keeps observing weights: it has no learnable range).
    ``batches`` yields image tensors (float 0-1 or uint8 0-255) or tuples whose first item is one.
    Returns the number of batches used. Create the optimizer after this: per-channel scales change shape.
    """
    was_training = prepared.training
    device = _device(prepared)
    prepared.eval()
    enable_calibration(prepared)
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            prepared(_images(batch, device))
            n += 1
        if n == 0:
            raise UserError("QAT calibration got no images (is the dataset empty?)")
        backend = getattr(prepared, "qat_backend", None)
        enable_quantization(prepared, weight_cali_on=bool(backend) and resolve_backend(backend).observe_weights)
    finally:
        prepared.train(was_training)
    return n


def quantizer_param_names(prepared) -> set:
    """Names of the learnable fake-quantizer parameters (scales, zero points) of a prepared model."""
    names = set()
    for mname, m in prepared.named_modules():
        if isinstance(m, torch.ao.quantization.FakeQuantizeBase):
            names.update(f"{mname}.{p}" if mname else p for p, _ in m.named_parameters())
    return names


def mark_no_decay(prepared) -> int:
    """Set ``no_decay = True`` on every quantizer parameter (the trainer's ``param_groups`` reads it).

    Returns how many parameters were marked.
    """
    names = quantizer_param_names(prepared)
    n = 0
    for name, p in prepared.named_parameters():
        if name in names:
            p.no_decay = True
            n += 1
    return n


def quantizer_param_groups(prepared):
    """Split trainable parameters into ``(quantizer_params, other_params)``.

    Quantizer scales and zero points must not get weight decay (it would shrink the ranges); give them
    their own optimizer group with ``weight_decay=0``.
    """
    qnames = quantizer_param_names(prepared)
    quant, rest = [], []
    for name, p in prepared.named_parameters():
        if p.requires_grad:
            (quant if name in qnames else rest).append(p)
    return quant, rest


def qat_state_dict(prepared) -> dict:
    """The prepared model's state (weights, BN statistics, quantizer ranges and flags) as CPU tensors."""
    return {k: v.detach().cpu().clone() for k, v in prepared.state_dict().items()}


def save_qat_state(prepared, path) -> None:
    """Write :func:`qat_state_dict` atomically.

    The file is a plain state_dict of tensors (``torch.load(weights_only=True)`` reads it); load it into a
    model prepared for the same backend with :func:`load_qat_state`.
    """
    save_torch(qat_state_dict(prepared), path)


def load_qat_state(prepared, source) -> None:
    """Load a QAT state (a path or a state_dict) into a freshly prepared model of the same backend.

    Per-channel quantizer tensors are resized first (they only get their shape at calibration), so no
    calibration is needed before loading. UserError names the first missing, unexpected or misshapen key.
    """
    sd = load_tensors(source) if not isinstance(source, dict) else source
    where = source if not isinstance(source, dict) else "QAT state"
    if not isinstance(sd, dict) or not is_quantized_state(sd):
        raise UserError(f"{where}: not a QAT state (no fake-quantizer entries); QAT starts from float weights "
                        "with prepare_qat")
    own = prepared.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        key = missing[0] if missing else extra[0]
        raise UserError(f"{where}: {'missing' if missing else 'unexpected'} tensor '{key}' (saved for another "
                        f"model or QAT backend? this one is {getattr(prepared, 'qat_backend', '?')})")
    quantizers = {n for n, m in prepared.named_modules() if isinstance(m, torch.ao.quantization.FakeQuantizeBase)}
    for k, v in sd.items():
        if own[k].shape == v.shape:
            continue
        owner = k.rsplit(".", 1)[0]
        if not any(owner == q or owner.startswith(q + ".") for q in quantizers):
            raise UserError(f"{where}: tensor '{k}' has shape {tuple(v.shape)}, "
                            f"the model needs {tuple(own[k].shape)}")
        _resize_tensor(prepared, k, v)
    prepared.load_state_dict(sd, strict=True)


def _resize_tensor(model, key, like):
    mod_name, attr = key.rsplit(".", 1)
    mod = model.get_submodule(mod_name)
    t = getattr(mod, attr)
    t.data = torch.empty(like.shape, dtype=t.dtype, device=t.device)


def float_state_dict(prepared, float_model) -> dict:
    """The float weights of a QAT-trained model, under the float model's key names.

    Fusion turns a conv ``C`` + its BatchNorm ``B`` into one QAT ConvBn module at ``C`` whose BatchNorm
    lives at ``C.bn`` (``prepared.fused_bn``, found by :func:`prepare_qat`, says which BN went where);
    every other parameter keeps its name. The result loads into the float model, so a QAT run's output is
    an ordinary artifact that can be fine-tuned, pruned or exported again.
    """
    psd = prepared.state_dict()
    fused = prepared.fused_bn
    out = {}
    for k, v in float_model.state_dict().items():
        owner, attr = k.rsplit(".", 1)
        src = psd.get(f"{fused[owner]}.bn.{attr}") if owner in fused else psd.get(k)
        if src is None or src.shape != v.shape:
            raise UserError(f"cannot map QAT tensor for '{k}' back to the float model")
        out[k] = src.detach().float().cpu().clone() if src.is_floating_point() else src.detach().cpu().clone()
    return out
