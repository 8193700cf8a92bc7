"""Recipes: a whole pipeline (dataset, starting model, ordered stages) in one YAML file.

A stage's options are the CLI flags of the command it runs (``remain-ratio: 0.6`` is
``--remain-ratio 0.6``), and the runner parses them with that command's own argparse parser and calls
the command's own function, so a recipe and the CLI cannot drift apart. Each stage writes its artifact
into ``OUT/<k>-<stage>/`` and the next stage reads it as ``--weights``; a finished stage is skipped when
the recipe is run again (resume after a crash). At the end ``summary.md`` and ``summary.json`` gather
params, GFLOPs, onnxruntime latency and mAP for every stage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .fileio import write_json, write_text

# stage name -> (command it runs, what it consumes: "model" a model artifact, "data" a dataset)
STAGES = {
    "train": "train",
    "finetune": "train",
    "slim": "slim",
    "eagleeye": "eagleeye",
    "prune": "prune",
    "qat": "qat",
    "export": "export",
    "val": "val",
    "bench": "bench",
}
# Stages whose output folder is a new model artifact (the next stage starts from it).
PRODUCES_MODEL = {"train", "finetune", "slim", "eagleeye", "prune", "qat"}
TOP_KEYS = {"name", "description", "data", "model", "imgsz", "stages", "smoke"}
SYNTH_KEYS = {"train", "val", "imgsz", "classes", "seed"}

# --smoke: the same stages at the size of a minute or two (applied only where a command has the flag).
SMOKE = {"epochs": 1, "imgsz": 128, "batch": 8, "candidates": 4, "bn-batches": 2, "eval-batches": 2,
         "calib-batches": 2, "runs": 3, "workers": 0, "top-k": 2}
SMOKE_DATA = {"train": 48, "val": 24, "imgsz": 128}


@dataclass
class Stage:
    """One parsed stage: its name, command, CLI options and the line it came from."""

    index: int
    name: str
    command: str
    options: dict
    line: int | None = None
    flags: frozenset = frozenset()  # option strings the stage's command accepts

    @property
    def folder(self) -> str:
        return f"{self.index}-{self.name}"


def _lines(text):
    """Line number of each stage entry (1-based), read from the YAML node marks."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    for k, v in getattr(root, "value", []) or []:
        if getattr(k, "value", None) == "stages" and isinstance(v, yaml.SequenceNode):
            return {i: n.start_mark.line + 1 for i, n in enumerate(v.value)}
    return {}


def _flag(name: str) -> str:
    return "--" + str(name).replace("_", "-")


def _argv_for(options: dict) -> list:
    argv = []
    for k, v in options.items():
        if isinstance(v, bool):
            if v:
                argv.append(_flag(k))
        elif isinstance(v, list):
            argv += [_flag(k), *map(str, v)]
        elif v is not None:
            argv += [_flag(k), str(v)]
    return argv


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so recipe errors name the stage."""

    def error(self, message):
        raise UserError(message)


def _command_parsers():
    from .cli import COMMAND_MODULES
    import importlib

    top = _Parser(prog="compress")
    sub = top.add_subparsers(dest="command", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"compress.commands.{name}").register(sub)
    return {name: p for name, p in sub.choices.items()}


def load_recipe(path, smoke: bool = False):
    """Read and validate a recipe before anything runs; returns (recipe dict, list of Stage).

    Unknown top-level keys, stage names or options, options of the wrong type and a missing dataset
    raise UserError naming the file, the stage (and its line) and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    text = path.read_text()
    try:
        r = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(r, dict):
        raise UserError(f"{path}: a recipe is a mapping with data, model and stages")
    unknown = set(r) - TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' (allowed: {', '.join(sorted(TOP_KEYS))})")
    for key in ("data", "model", "stages"):
        if key not in r:
            raise UserError(f"{path}: missing key '{key}'")
    _check_data(path, r["data"])
    m = r["model"]
    if not isinstance(m, dict) or not ({"cfg", "weights"} & set(m)) or set(m) - {"cfg", "weights"}:
        raise UserError(f"{path}: 'model' must be a mapping with 'cfg' and/or 'weights'")
    if not isinstance(r["stages"], list) or not r["stages"]:
        raise UserError(f"{path}: 'stages' must be a non-empty list")
    lines, parsers, stages = _lines(text), _command_parsers(), []
    for i, entry in enumerate(r["stages"]):
        where = f"{path}: stage {i + 1}" + (f" (line {lines[i]})" if i in lines else "")
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"{where}: a stage is '- NAME: {{options}}'")
        (name, opts), = entry.items()
        opts = dict(opts or {})
        if name not in STAGES:
            raise UserError(f"{where}: unknown stage '{name}' (stages: {', '.join(STAGES)})")
        cmd = STAGES[name]
        if cmd not in parsers:
            raise UserError(f"{where}: stage '{name}' needs the '{cmd}' command, which this version lacks")
        parser = parsers[cmd]
        known = {s for a in parser._actions for s in a.option_strings}
        for k in opts:
            if _flag(k) not in known or k in ("out", "weights", "data", "resume"):
                raise UserError(f"{where}: stage '{name}' has no option '{k}'")
        if smoke:
            opts.update({k: v for k, v in SMOKE.items() if _flag(k) in known and k != "imgsz"})
        st = Stage(i + 1, name, cmd, opts, lines.get(i), frozenset(known))
        try:
            parser.parse_args(stage_argv(st, "DATA.yaml", {"weights": "PREVIOUS"}, None, Path("OUT"))[1:])
        except UserError as e:
            raise UserError(f"{where}: {name}: {e}") from None
        stages.append(st)
    return r, stages


def _check_data(path, data):
    if isinstance(data, str):
        p = (path.parent / data) if not Path(data).is_absolute() else Path(data)
        if not p.is_file() and not Path(data).is_file():
            raise UserError(f"{path}: data: no such dataset file '{data}'")
    elif isinstance(data, dict) and set(data) == {"synthetic"}:
        syn = data["synthetic"] or {}
        bad = set(syn) - SYNTH_KEYS
        if bad:
            raise UserError(f"{path}: data.synthetic: unknown option '{sorted(bad)[0]}' "
                            f"(allowed: {', '.join(sorted(SYNTH_KEYS))})")
        for k, v in syn.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise UserError(f"{path}: data.synthetic.{k}: expected an integer, got {v!r}")
    else:
        raise UserError(f"{path}: 'data' must be a data.yaml path or {{synthetic: {{...}}}}")


def run_recipe(path, out=None, smoke: bool = False, from_stage: int | None = None) -> dict:
    """Run a recipe; returns the summary (also written as summary.json / summary.md in ``out``)."""
    from .cli import build_parser

    recipe, stages = load_recipe(path, smoke)
    name = recipe.get("name") or Path(path).stem
    out = Path(out or f"runs/recipes/{name}{'-smoke' if smoke else ''}")
    out.mkdir(parents=True, exist_ok=True)
    if from_stage is not None and not 1 <= from_stage <= len(stages):
        raise UserError(f"--from-stage {from_stage}: the recipe has stages 1..{len(stages)}")
    data = _prepare_data(recipe["data"], Path(path), out, smoke)
    imgsz = SMOKE["imgsz"] if smoke else recipe.get("imgsz")
    model_arg = recipe["model"]
    current = {"weights": _rel(Path(path), model_arg["weights"])} if "weights" in model_arg else {"cfg": model_arg["cfg"]}
    rows, parser, dirty = [], build_parser(), False
    for st in stages:
        folder = out / st.folder
        done = folder / ".stage-done.json"
        argv = stage_argv(st, data, current, imgsz, folder)
        key = hashlib.sha1(json.dumps(argv).encode()).hexdigest()
        finished = done.is_file() and json.loads(done.read_text()).get("key") == key
        if finished and not dirty and (from_stage is None or st.index < from_stage):
            print(f"[{st.index}/{len(stages)}] {st.name}: done before, skipped ({folder})")
        else:
            dirty = True  # every later stage consumes what this one writes
            if folder.exists():
                shutil.rmtree(folder)
            print(f"\n[{st.index}/{len(stages)}] {st.name}: compress {' '.join(argv)}")
            args = parser.parse_args(argv)
            t0 = time.time()
            rc = args.func(args)
            if rc:
                raise UserError(f"stage {st.index} ({st.name}) failed with exit code {rc}")
            write_json(done, {"key": key, "seconds": round(time.time() - t0, 1), "argv": argv})
        if st.name in PRODUCES_MODEL:
            current = {"weights": folder}
        rows.append(_stage_row(st, folder))
    _add_latency(rows, imgsz or recipe.get("imgsz") or 320, runs=5 if smoke else 50)
    summary = {"recipe": str(path), "smoke": smoke, "out": str(out), "stages": rows}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    print("\n" + summary_markdown(summary, markdown=False))
    print(f"\nsummary: {out / 'summary.md'}")
    return summary


def stage_argv(st: Stage, data, current: dict, imgsz, folder: Path) -> list:
    """The ``compress`` command line a stage runs: its options plus data, input model and output folder."""
    argv = [st.command]
    argv += ["--data", str(data)] if "--data" in st.flags else []
    argv += ["--weights", str(current["weights"])] if "weights" in current else ["--cfg", str(current["cfg"])]
    if imgsz and "imgsz" not in st.options:
        argv += ["--imgsz", str(imgsz)]
    argv += _argv_for(st.options)
    return argv + ["--out", str(folder / "model.onnx" if st.command == "export" else folder)]


def _rel(recipe_path: Path, p):
    q = Path(p)
    return q if q.is_absolute() or q.exists() else recipe_path.parent / q


def _prepare_data(data, recipe_path: Path, out: Path, smoke: bool) -> Path:
    if isinstance(data, str):
        return _rel(recipe_path, data)
    from .data.synth import make_synthetic_dataset

    opts = dict(data["synthetic"] or {})
    if smoke:
        opts.update(SMOKE_DATA)
    target = out / "data"
    if (target / "data.yaml").is_file() and (target / ".options.json").is_file() and \
            json.loads((target / ".options.json").read_text()) == opts:
        return target / "data.yaml"
    kw = {"n_train": opts.get("train", 800), "n_val": opts.get("val", 200), "imgsz": opts.get("imgsz", 320),
          "classes": opts.get("classes", 4), "seed": opts.get("seed", 0)}
    print(f"synthesizing the dataset into {target} ({kw['n_train']} train / {kw['n_val']} val images)")
    path = make_synthetic_dataset(target, **kw)
    write_json(target / ".options.json", opts)
    return path


def _stage_row(st: Stage, folder: Path) -> dict:
    """params / GFLOPs / latency / mAP of what a stage produced (or measured)."""
    rep = {}
    f = folder / "report.json"
    if f.is_file():
        rep = json.loads(f.read_text())
    return {"stage": st.folder, "name": st.name, "folder": str(folder), "params": rep.get("params"),
            "gflops": rep.get("gflops"), "latency_ms": rep.get("latency_ms"), "map50": rep.get("map50"),
            "map": rep.get("map"), "seconds": _seconds(folder)}


def _add_latency(rows: list, imgsz: int, runs: int) -> None:
    """Fill ``latency_ms`` of every model a stage produced, measured side by side (interleaved rounds)."""
    from .export import compare_latency
    from .model.artifact import load_model

    todo = [r for r in rows if r["name"] in PRODUCES_MODEL and r["latency_ms"] is None]
    if not todo:
        return
    print(f"\nonnxruntime latency of {len(todo)} stage models at {imgsz}px (2 threads, interleaved)")
    lat = compare_latency({r["stage"]: load_model(r["folder"]) for r in todo}, imgsz, runs=runs, threads=2)
    for r, m in zip(todo, lat):
        r["latency_ms"] = m["median_ms"]


def _seconds(folder):
    d = folder / ".stage-done.json"
    return json.loads(d.read_text()).get("seconds") if d.is_file() else None


def summary_markdown(summary: dict, markdown: bool = True) -> str:
    """The summary table (one row per stage)."""
    from .tables import format_table

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    rows = [[r["stage"], f(r["params"], ","), f(r["gflops"], ".2f"), f(r["latency_ms"], ".1f"),
             f(r["map50"], ".3f"), f(r["map"], ".3f"), f(r["seconds"], ".0f")] for r in summary["stages"]]
    table = format_table(["stage", "params", "GFLOPs", "latency ms", "mAP50", "mAP50-95", "seconds"], rows,
                         markdown=markdown)
    if not markdown:
        return table
    return f"# {Path(summary['recipe']).stem}{' (smoke)' if summary['smoke'] else ''}\n\n{table}\n"
