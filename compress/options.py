"""Options of a stage, declared once: the dataclass field is the CLI flag, the recipe key and the check.

A stage's options are a dataclass of :func:`option` fields (``kw_only``, so mixins compose in any order).
From that one declaration:

- :func:`add_arguments` adds the argparse flags (``remain_ratio`` -> ``--remain-ratio``, plus aliases,
  help text with the default); parsed flags become options with :meth:`Options.from_args`, which records
  which fields the user gave (``given``) so that a default can depend on the input (the image size of an
  artifact) and ``--resume`` can refuse options that would be ignored;
- :meth:`Options.from_mapping` reads a recipe's stage mapping (``remain-ratio: 0.6``) with the same types
  and the same messages argparse gives;
- :meth:`Options.validate` checks every value before any work starts and raises one
  :class:`~compress.errors.UserError` naming the flag (``--remain-ratio 1.5: must be in (0, 1]``).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from .errors import UserError

_INTERNAL = {"given"}


def option(default=None, help: str = "", *, flags=(), choices=None, metavar=None, required=False, cli=True,
           nargs=None, const=None, recipe=True, hidden=False, default_help=None, group=None):
    """A dataclass field declaring one option.

    ``help`` is the --help text (the default is appended, or ``default_help`` when given); ``flags`` extra
    option strings (``("--batch-size",)``); ``required`` makes argparse require the flag and
    :meth:`Options.validate` refuse ``None``; ``cli=False`` keeps the field off the command line (set by
    code), ``recipe=False`` off recipes (the runner sets it: out, weights, data); ``hidden`` suppresses
    its help; ``nargs``/``const`` as argparse's (``nargs="+"`` for list fields); ``group`` an argparse
    argument group title.
    """
    md = dict(help=help, flags=tuple(flags), choices=choices, metavar=metavar, required=required, cli=cli,
              nargs=nargs, const=const, recipe=recipe and cli, hidden=hidden, default_help=default_help,
              group=group)
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


def flag_name(name: str) -> str:
    """``remain_ratio`` -> ``--remain-ratio``; ``global_`` (a Python keyword) -> ``--global``."""
    return "--" + name.rstrip("_").replace("_", "-")


def _key_name(key) -> str:
    return str(key).replace("-", "_")


@dataclass(kw_only=True)
class Options:
    """Base of every stage's options: construction from flags or recipes, and the checks."""

    given: frozenset = field(default=frozenset(), repr=False, compare=False, metadata={"cli": False})

    # ---------------------------------------------------------------------------------- declaration
    @classmethod
    def option_fields(cls, cli_only: bool = True) -> list:
        """The option fields (on the command line, or all but internal ones)."""
        return [f for f in dataclasses.fields(cls)
                if f.name not in _INTERNAL and (f.metadata.get("cli", True) or not cli_only)]

    @classmethod
    def _types(cls) -> dict:
        return typing.get_type_hints(cls)

    # ---------------------------------------------------------------------------------- construction
    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides):
        """Options from parsed flags (only the flags given are set; the rest keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in cls.option_fields() if hasattr(args, f.name)}
        given = frozenset(values)
        values.update(overrides)
        return cls(**values, given=given)

    @classmethod
    def from_mapping(cls, mapping: dict, **fixed):
        """Options from a recipe's stage mapping (kebab or snake keys) plus ``fixed`` values set by the runner.

        Unknown keys, keys a recipe may not set and values of the wrong type raise UserError in argparse's
        words (``stage 'prune' has no option 'x'`` is added by the caller: this raises ``KeyError`` for them).
        """
        allowed = {f.name: f for f in cls.option_fields() if f.metadata.get("recipe", True)}
        types_ = cls._types()
        values = {}
        for key, value in (mapping or {}).items():
            name = _key_name(key)
            if name not in allowed and name + "_" in allowed:
                name += "_"
            if name not in allowed:
                raise KeyError(key)
            values[name] = coerce(value, types_[name], allowed[name])
        given = frozenset(values) | frozenset(k for k, v in fixed.items() if v is not None)
        values.update(fixed)
        return cls(**values, given=given)

    def replace(self, **changes):
        """A copy with ``changes`` applied (they count as given)."""
        return dataclasses.replace(self, **changes, given=self.given | frozenset(changes))

    def to_dict(self) -> dict:
        """The option values (every field but internal ones), for reports and opt.yaml."""
        return {f.name.rstrip("_"): _plain(getattr(self, f.name)) for f in self.option_fields(cli_only=False)}

    # ---------------------------------------------------------------------------------- checks
    def validate(self):
        """Raise UserError for the first bad value (before anything is loaded or written); returns self."""
        for f in self.option_fields():
            v = getattr(self, f.name)
            if f.metadata.get("required") and v is None:
                raise UserError(f"{flag_name(f.name)} is required ({_first_sentence(f.metadata.get('help'))})")
            choices = f.metadata.get("choices")
            if choices and v is not None and v not in choices:
                raise UserError(f"{flag_name(f.name)} {v}: choose one of {', '.join(map(str, choices))}")
            if f.name == "seed" and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 32):
                raise UserError(f"--seed {v}: must be an integer in 0..{2 ** 32 - 1}")
        self.check()
        return self

    def check(self) -> None:
        """Stage-specific checks of values; override (call super) and raise UserError."""

    def require_positive(self, *names) -> None:
        """Each named option is a positive integer (or None)."""
        for name in names:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"{flag_name(name)} {v}: must be a positive integer")

    def require_non_negative(self, *names) -> None:
        """Each named option is an integer >= 0 (or None)."""
        for name in names:
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise UserError(f"{flag_name(name)} {v}: must be an integer >= 0")

    def require_range(self, name, lo, hi, lo_open=False, hi_open=False, what="") -> None:
        """The named number lies in the interval (given by its ends and which are open)."""
        v = getattr(self, name)
        if v is None:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise UserError(f"{flag_name(name)} {v}: must be in {span}" + (f" ({what})" if what else ""))


def _first_sentence(text) -> str:
    text = (text or "").split(";")[0].split(". ")[0].strip()
    return text or "see --help"


def _plain(v):
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (frozenset, set, tuple)):
        return list(v)
    return v


# ----------------------------------------------------------------------------------------------- types
def _base_types(tp) -> tuple:
    """The non-None members of a (possibly optional / union) annotation."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(t for t in typing.get_args(tp) if t is not type(None))
    return (tp,)


def _origin(tp):
    return typing.get_origin(tp) or tp


def coerce(value, tp, f=None):
    """``value`` (from a recipe's YAML) checked and converted to the annotation ``tp``.

    Raises UserError in argparse's words (``argument --epochs: invalid int value: 'one'``).
    """
    name = flag_name(f.name) if f is not None else "option"
    if value is None:
        return None
    bases = _base_types(tp)
    for t in bases:
        o = _origin(t)
        if o is bool and isinstance(value, bool):
            return value
        if o is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if o is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if o is list and isinstance(value, (list, tuple)):
            return [str(x) if not isinstance(x, (int, float)) else x for x in value]
        if o is dict and isinstance(value, dict):
            return value
    for t in bases:  # strings spelled in the YAML: convert as argparse would
        o = _origin(t)
        if o is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if o is list and isinstance(value, (str, int)):
            return [str(value)]
        if o in (int, float) and isinstance(value, str):
            try:
                return o(value)
            except ValueError:
                pass
        if o is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    want = "/".join(getattr(_origin(t), "__name__", str(t)) for t in bases)
    raise UserError(f"argument {name}: invalid {want} value: {value!r}")


# ----------------------------------------------------------------------------------------------- argparse
class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr and exit code 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default_text(f) -> str | None:
    """How --help shows a field's default (None: show nothing)."""
    md = f.metadata
    if md.get("default_help"):
        return md["default_help"]
    d = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                      else None)
    if d is None or d is False or d == [] or md.get("required"):
        return None
    return str(d)


_HELP_ORDER = {"cfg": 0, "weights": 0, "imgsz": 0, "data": 0, "device": 2, "workers": 2, "out": 3, "name": 3}


def add_arguments(parser, cls, skip=()) -> None:
    """Add one argparse flag per command-line field of ``cls`` (defaults stay unset: see from_args).

    --help lists the model and data flags first, then the stage's own, then device and output.
    """
    hints = typing.get_type_hints(cls)
    groups = {}
    for f in sorted(cls.option_fields(), key=lambda f: _HELP_ORDER.get(f.name, 1)):
        if f.name in skip:
            continue
        md = f.metadata
        target = parser
        if md.get("group"):
            target = groups.setdefault(md["group"], parser.add_argument_group(md["group"]))
        strings = [flag_name(f.name), *md.get("flags", ())]
        help_ = md.get("help") or ""
        dt = default_text(f)
        if dt is not None:
            help_ = f"{help_} (default: {dt})" if help_ else f"default: {dt}"
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS if md.get("hidden") else help_)
        bases = [_origin(t) for t in _base_types(hints[f.name])]
        if md.get("nargs") == "?":
            kw.update(nargs="?", const=md.get("const"))
        elif bases == [bool]:
            kw.update(action="store_true")
        elif list in bases:
            kw.update(nargs=md.get("nargs") or "+", action="extend" if md.get("nargs") is None else "store")
        else:
            scalar = next((t for t in bases if t in (int, float)), None)
            if scalar is not None and str not in bases:
                kw["type"] = scalar
        if md.get("choices"):
            kw["choices"] = md["choices"]
        if md.get("metavar"):
            kw["metavar"] = md["metavar"]
        if md.get("required"):
            kw["required"] = True
        target.add_argument(*strings, **kw)


# ----------------------------------------------------------------------------------------------- mixins
DEFAULT_IMGSZ = 640
MAX_IMGSZ = 4096
RATIO_CONVENTIONS = (
    "Three ratio conventions, one per method's literature: `prune --ratio R` is the share of the model's "
    "FLOPs to REMOVE; `eagleeye --remain-ratio R` the share of FLOPs to KEEP; `slim --global-percent P` "
    "the share of prunable CHANNELS to remove. Every report states the result as flops_ratio (FLOPs kept "
    "/ FLOPs of the parent).")


@dataclass(kw_only=True)
class ModelInput(Options):
    """``--cfg`` / ``--weights`` / ``--imgsz`` as in ultralytics YOLOv5."""

    cfg: str | dict | None = option(None, "model YAML (a path or a shipped name, e.g. yolov5s)")
    weights: str | None = option(None, "artifact directory, an artifact's weights.pt, or an ultralytics YOLOv5 .pt",
                                 recipe=False)
    imgsz: int | None = option(None, "image size in pixels (square)", flags=("--img", "--img-size"),
                               default_help=f"the --weights artifact's own, else {DEFAULT_IMGSZ}")

    def check(self):
        super().check()
        if self.imgsz is not None:
            self.require_positive("imgsz")
            if self.imgsz > MAX_IMGSZ:
                raise UserError(f"--imgsz {self.imgsz}: must be at most {MAX_IMGSZ}")
            if self.imgsz % 32:
                raise UserError(f"--imgsz {self.imgsz} must be a positive multiple of 32 (the stride of YOLOv5's "
                                f"coarsest level)")

    def resolved_imgsz(self) -> int:
        """``--imgsz`` if given, else the image size recorded in the ``--weights`` artifact, else 640."""
        if self.imgsz is not None:
            return int(self.imgsz)
        if self.weights:
            from .model.artifact import read_report

            size = read_report(self.weights).get("imgsz")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0 and size % 32 == 0:
                return size
        return DEFAULT_IMGSZ


@dataclass(kw_only=True)
class DataInput(Options):
    """``--data``: a dataset's data.yaml."""

    data: str | None = option(None, "dataset data.yaml", recipe=False)


@dataclass(kw_only=True)
class DeviceOptions(Options):
    """``--device`` and ``--workers``."""

    device: str = option("cpu", "cpu, 0, cuda:0 ... (under torchrun: each process its own GPU)")
    workers: int = option(2, "dataloader worker processes")

    def check(self):
        super().check()
        self.require_non_negative("workers")
        from .engine.device import select_device

        select_device(self.device)


@dataclass(kw_only=True)
class OutputOptions(Options):
    """``--out DIR`` (default ``runs/<command>/exp``, ``exp2``, ...)."""

    out: str | None = option(None, "output folder", default_help="runs/<command>/exp, exp2, ...", recipe=False)
    name: str = option("exp", "run name under runs/<command>/", hidden=True, recipe=False)
