"""Recipes: a whole pipeline (dataset, starting model, ordered stages) in one YAML file.

A stage's options are its stage's option fields (``remain-ratio: 0.6`` is ``EagleEyeOptions.remain_ratio``,
the same field the CLI flag ``--remain-ratio`` sets), read through the stage registry
(:mod:`compress.stages`), so a recipe and the CLI cannot drift apart. :func:`check_recipe` checks
everything before anything runs: keys, every option's value, the dataset, the starting model and
whether each stage has the input it needs. Each stage writes its artifact into ``OUT/<k>-<stage>/`` and
the next stage starts from it. Run again, a recipe skips finished stages and resumes an interrupted
``train``/``finetune`` (from its last checkpoint) or ``eagleeye`` (from its candidates.jsonl) stage. At the
end ``summary.md`` and ``summary.json`` gather params, GFLOPs, onnxruntime latency and mAP of every stage.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .fileio import unfinished_stage, write_json, write_text
from .report import METRICS, Report
from .stages import STAGES, StageSpec
from .stages.distill import PARENT

TOP_KEYS = {"name", "description", "data", "model", "imgsz", "stages"}
SYNTH_KEYS = {"train", "val", "imgsz", "classes", "seed"}
# Set by the runner, never by a recipe stage.
RUNNER_KEYS = ("out", "weights", "data", "resume")

# --smoke: the same stages at the size of a minute or two (applied only where a stage has the option).
SMOKE = {"epochs": 1, "batch": 8, "candidates": 4, "bn_batches": 2, "eval_batches": 2, "calib_batches": 2,
         "runs": 3, "workers": 0, "top_k": 2}
SMOKE_IMGSZ = 128
SMOKE_DATA = {"train": 48, "val": 24, "imgsz": 128}
DONE, STARTED = ".stage-done.json", ".stage-started.json"


@dataclass
class Stage:
    """One parsed stage: its index, name, registry entry, recipe options and the line it came from."""

    index: int
    name: str
    spec: StageSpec
    options: dict
    line: int | None = None
    where: str = ""

    @property
    def folder(self) -> str:
        return f"{self.index}-{self.name}"

    @property
    def fields(self) -> set:
        return {f.name for f in self.spec.options.option_fields(cli_only=False)}

    def build(self, data, current: dict, imgsz, folder) -> object:
        """The stage's options for this run: the recipe's values plus input model, data, size and folder."""
        fixed = {}
        if "data" in self.fields:
            fixed["data"] = str(data)
        if self.spec.name == "bench":
            fixed["weights"] = [str(current.get("weights") or current.get("cfg"))]
        elif "weights" in current:
            fixed["weights"] = str(current["weights"])
        if self.spec.name != "bench" and current.get("cfg") and "cfg" not in self.options and "cfg" in self.fields:
            fixed["cfg"] = current["cfg"]  # from a YAML, or with a bare state_dict as weights
        if imgsz and "imgsz" not in self.options and "imgsz" in self.fields:
            fixed["imgsz"] = int(imgsz)
        if folder is not None:
            fixed["out"] = str(Path(folder) / "model.onnx") if self.spec.name == "export" else str(folder)
        try:
            return self.spec.options.from_mapping(self.options, **fixed)
        except KeyError as e:
            raise UserError(f"{self.where}: stage '{self.name}' has no option '{e.args[0]}'") from None
        except UserError as e:
            raise UserError(f"{self.where}: {self.name}: {e}") from None


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


def load_recipe(path, smoke: bool = False):
    """Read a recipe and check every stage's options; returns ``(recipe dict, list of Stage)``.

    Unknown top-level keys, stage names or options, options of the wrong type or out of range and a
    missing dataset file raise UserError naming the file, the stage (and its line) and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    try:
        text = path.read_text()
        r = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable text file ({type(e).__name__})") from None
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
    name = r.get("name")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)
                             or ".." in name):
        raise UserError(f"{path}: name {name!r}: a plain name (letters, digits, '.', '_', '-'): it names the "
                        f"run folder runs/recipes/<name>")
    imgsz = r.get("imgsz")
    if imgsz is not None and (isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 32 or imgsz % 32):
        raise UserError(f"{path}: imgsz {imgsz!r}: must be a positive multiple of 32")
    if not isinstance(r["stages"], list) or not r["stages"]:
        raise UserError(f"{path}: 'stages' must be a non-empty list")
    lines, stages = _lines(text), []
    has_weights, pruned = "weights" in m, False
    for i, entry in enumerate(r["stages"]):
        where = f"{path}: stage {i + 1}" + (f" (line {lines[i]})" if i in lines else "")
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise UserError(f"{where}: a stage is '- NAME: {{options}}'")
        (name, opts), = entry.items()
        if name not in STAGES:
            raise UserError(f"{where}: unknown stage '{name}' (stages: {', '.join(STAGES)})")
        if opts is not None and not isinstance(opts, dict):
            raise UserError(f"{where}: the options of stage '{name}' must be a mapping, got {opts!r}")
        spec = STAGES[name]
        opts = {str(k): v for k, v in (opts or {}).items()}
        for k in opts:
            if k.replace("-", "_") in RUNNER_KEYS:
                raise UserError(f"{where}: stage '{name}' has no option '{k}' (the recipe runner sets it)")
        st = Stage(i + 1, name, spec, opts, lines.get(i), where)
        if smoke:
            st.options.update({k: v for k, v in SMOKE.items() if k in st.fields})
        if spec.needs_weights and not has_weights:
            raise UserError(f"{where}: {name} has no trained model to start from: {spec.needs_weights}")
        if opts.get("teacher") == PARENT and not (pruned or "weights" in m):
            raise UserError(f"{where}: {name}: teacher: parent is the model an earlier prune, slim or eagleeye "
                            f"stage pruned from, and no stage before this one prunes (name a teacher model)")
        o = st.build("DATA.yaml", {"weights": "PREVIOUS"} if has_weights else {"cfg": m.get("cfg")},
                     SMOKE_IMGSZ if smoke else imgsz, None)
        try:
            o.validate()
        except UserError as e:
            raise UserError(f"{where}: {name}: {e}") from None
        has_weights = has_weights or spec.produces_model
        pruned = pruned or spec.prunes
        stages.append(st)
    return r, stages


def check_recipe(path, smoke: bool = False, from_stage: int | None = None):
    """:func:`load_recipe` plus everything a run would trip on before it runs: the dataset (read and
    checked), the starting model (loaded), ``--from-stage``, and every stage's own checks of its options
    against its input model and the dataset (excludes that match nothing, an unreachable FLOPs window, too
    few images for the batches asked, a missing split...) wherever that model's architecture is known (up
    to the first stage that prunes).

    What ``compress run --check`` runs (and every run, first); returns the same ``(recipe, stages)``.
    """
    from .model.artifact import load_model
    from .model.profile import check_imgsz

    r, stages = load_recipe(path, smoke)
    path = Path(path)
    if from_stage is not None and not 1 <= from_stage <= len(stages):
        raise UserError(f"--from-stage {from_stage}: the recipe has stages 1..{len(stages)}")
    info = _data_info(r["data"], path, smoke)
    m = r["model"]
    try:
        if "weights" in m:
            model = load_model(_cfg(path, m.get("cfg")), _rel(path, m["weights"]))
            info.check_model(model)
        else:
            model = load_model(_cfg(path, m["cfg"]), nc=info.nc)
    except UserError as e:
        raise UserError(f"{path}: model: {e}") from None
    size = SMOKE_IMGSZ if smoke else r.get("imgsz")
    current = {"weights": "PREVIOUS"} if "weights" in m else {"cfg": m.get("cfg")}
    known = True  # the input architecture of the next stage is the starting model's
    for st in stages:
        try:
            s = st.options.get("imgsz", size)
            if known and s is not None:
                check_imgsz(model, int(s))
            if known:
                st.spec.preflight(st.build("DATA.yaml", current, size, None), model, info)
        except UserError as e:
            raise UserError(f"{st.where}: {st.name}: {e}") from None
        current = {"weights": "PREVIOUS"} if st.spec.produces_model else current
        known = known and not st.spec.prunes
    return r, stages


def _data_info(data, path: Path, smoke: bool):
    from .stages.base import DataInfo

    if isinstance(data, str):
        from .data.dataset import load_data_yaml

        return DataInfo.of(load_data_yaml(_rel(path, data)))
    syn = {**(data["synthetic"] or {}), **(SMOKE_DATA if smoke else {})}
    return DataInfo.synthetic(syn.get("train", 800), syn.get("val", 200), syn.get("classes", 4),
                              f"{path}: data.synthetic")


def _check_data(path, data):
    if isinstance(data, str):
        if not _rel(path, data).is_file():
            raise UserError(f"{path}: data: no such dataset file '{data}'")
    elif isinstance(data, dict) and set(data) == {"synthetic"}:
        from .data.shapes import SHAPES

        syn = data["synthetic"] or {}
        if not isinstance(syn, dict):
            raise UserError(f"{path}: data.synthetic: expected a mapping of options, got {syn!r}")
        bad = set(syn) - SYNTH_KEYS
        if bad:
            raise UserError(f"{path}: data.synthetic: unknown option '{sorted(bad)[0]}' "
                            f"(allowed: {', '.join(sorted(SYNTH_KEYS))})")
        limits = {"train": (1, None), "val": (1, None), "imgsz": (32, 4096), "classes": (1, len(SHAPES)),
                  "seed": (0, None)}
        for k, v in syn.items():
            lo, hi = limits[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
                raise UserError(f"{path}: data.synthetic.{k}: expected an integer {span}, got {v!r}")
    else:
        raise UserError(f"{path}: 'data' must be a data.yaml path or {{synthetic: {{...}}}}")


def run_recipe(path, out=None, smoke: bool = False, from_stage: int | None = None) -> dict:
    """Run a recipe; returns the summary (also written as summary.json / summary.md in ``out``)."""
    recipe, stages = check_recipe(path, smoke, from_stage)
    name = recipe.get("name") or Path(path).stem
    out = Path(out or f"runs/recipes/{name}{'-smoke' if smoke else ''}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    from .fileio import check_writable

    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _prepare_data(recipe["data"], Path(path), out, smoke)
    imgsz = SMOKE_IMGSZ if smoke else recipe.get("imgsz")
    model_arg = recipe["model"]
    cfg = _cfg(Path(path), model_arg.get("cfg"))
    current = ({"weights": _rel(Path(path), model_arg["weights"]), "cfg": cfg} if "weights" in model_arg
               else {"cfg": cfg})
    rows, dirty = [], False
    for st in stages:
        folder = out / st.folder
        o = st.build(data, current, imgsz, folder)
        key = hashlib.sha1(json.dumps(o.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
        if _done(folder, key) and not dirty and (from_stage is None or st.index < from_stage):
            print(f"[{st.index}/{len(stages)}] {st.name}: done before, skipped ({folder})")
        else:
            dirty = True  # every later stage consumes what this one writes
            t0 = time.time()
            resumed = _resumable(st, folder, key) if from_stage is None or st.index < from_stage else None
            if resumed is not None:
                print(f"\n[{st.index}/{len(stages)}] {st.name}: resuming the interrupted run in {folder}")
                o = resumed(o)
            else:
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
                write_json(folder / STARTED, {"key": key})
                print(f"\n[{st.index}/{len(stages)}] {st.name} -> {folder}")
            try:
                st.spec.run(o)
            except UserError as e:
                raise UserError(f"{st.where}: {st.name}: {e}") from None
            write_json(folder / DONE, {"key": key, "seconds": round(time.time() - t0, 1)})
        if st.spec.produces_model:
            current = {"weights": folder}
        rows.append(_stage_row(st, folder))
    _add_latency(rows, imgsz or 640, runs=5 if smoke else 50)
    summary = {"recipe": str(path), "smoke": smoke, "out": str(out), "stages": rows}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary))
    print("\n" + summary_markdown(summary, markdown=False))
    print(f"\nsummary: {out / 'summary.md'}")
    return summary


def _done(folder: Path, key: str) -> bool:
    f = folder / DONE
    try:
        return f.is_file() and json.loads(f.read_text()).get("key") == key
    except (json.JSONDecodeError, OSError):
        return False


def _resumable(st: Stage, folder: Path, key: str):
    """How to resume an interrupted stage in ``folder`` with the same options (a function on its options),
    or None when it must start over (another key, nothing to resume from, or a stage that cannot resume)."""
    try:
        started = json.loads((folder / STARTED).read_text()).get("key")
    except (OSError, json.JSONDecodeError):
        return None
    if started != key or not unfinished_stage(folder):
        return None
    if st.spec.command == "train" and all((folder / f).is_file() for f in ("last/train_state.pt", "opt.yaml")):
        return lambda o: type(o)(resume=str(folder), given=frozenset({"resume"}))
    if st.spec.name == "eagleeye" and (folder / "search.json").is_file():
        return lambda o: o.replace(resume=True)
    return None


def _rel(recipe_path: Path, p) -> Path:
    """A path of the recipe: relative to the recipe's folder (where it exists there), else as given."""
    q = Path(p)
    if q.is_absolute():
        return q
    beside = Path(recipe_path).parent / q
    return beside if beside.exists() else q


def _cfg(recipe_path: Path, cfg):
    """A model YAML of the recipe: a file beside the recipe, else as given (a path or a shipped name)."""
    if cfg is None or isinstance(cfg, dict):
        return cfg
    beside = Path(recipe_path).parent / str(cfg)
    return str(beside) if not Path(str(cfg)).is_absolute() and beside.is_file() else cfg


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
    """params / GFLOPs / latency / mAP of what a stage produced (or measured), from its Report."""
    rep = Report.read(folder) or Report(stage=st.name)
    return {"stage": st.folder, "name": st.name, "folder": str(folder), "params": rep.params,
            "gflops": rep.gflops, "flops_ratio": rep.flops_ratio, "latency_ms": rep.latency_ms, "map50": rep.map50,
            "map": rep.map, "metric": rep.metric, "seconds": _seconds(folder)}


def _add_latency(rows: list, imgsz: int, runs: int) -> None:
    """Fill ``latency_ms`` of every model a stage produced, measured side by side (interleaved rounds)."""
    from .export import compare_latency
    from .model.artifact import load_model

    todo = [r for r in rows if STAGES[r["name"]].produces_model and r["latency_ms"] is None]
    if not todo:
        return
    print(f"\nonnxruntime latency of {len(todo)} stage models at {imgsz}px (2 threads, interleaved)")
    lat = compare_latency({r["stage"]: load_model(r["folder"]) for r in todo}, imgsz, runs=runs, threads=2)
    for r, m in zip(todo, lat):
        r["latency_ms"] = m["median_ms"]


def _seconds(folder):
    d = folder / DONE
    return json.loads(d.read_text()).get("seconds") if d.is_file() else None


def summary_markdown(summary: dict, markdown: bool = True) -> str:
    """The summary table (one row per stage), with a note naming the mAP definition it shows."""
    from .tables import format_table

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    rows = [[r["stage"], f(r["params"], ","), f(r["gflops"], ".3f"), f(r.get("flops_ratio"), ".3f"),
             f(r["latency_ms"], ".1f"), f(r["map50"], ".3f"), f(r["map"], ".3f"), f(r["seconds"], ".0f")]
            for r in summary["stages"]]
    table = format_table(["stage", "params", "GFLOPs", "FLOPs ratio", "latency ms", "mAP50", "mAP50-95", "seconds"],
                         rows, markdown=markdown)
    metrics = sorted({r.get("metric") for r in summary["stages"] if r.get("metric")})
    note = "mAP: " + ", ".join(METRICS.get(m, m) for m in metrics) if metrics else ""
    if not markdown:
        return table + (f"\n{note}" if note else "")
    title = f"# {Path(summary['recipe']).stem}{' (smoke)' if summary['smoke'] else ''}"
    return f"{title}\n\n{table}\n" + (f"\n{note}\n" if note else "")
