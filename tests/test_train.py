"""The training loop: CLI run, artifacts, exact resume, callbacks, non-finite loss, 2-process gloo DDP."""
import json
import os
import subprocess
import sys

import pytest
import torch

from compress.engine.trainer import Callback, TrainOptions, resume, save_options, train
from compress.errors import UserError

from conftest import tiny_cfg


def opts(tmp_path, data, **kw):
    base = dict(data=str(data), cfg=None, epochs=2, imgsz=64, batch=8, workers=0, out=str(tmp_path / "run"),
                progress=False)
    base.update(kw)
    return TrainOptions(**base)


def weights(d):
    return torch.load(d / "weights.pt", weights_only=True)


def test_train_writes_artifacts_and_reloads(tmp_path, synth_data):
    from compress.model.artifact import load_model

    model = load_model(tiny_cfg())
    o = opts(tmp_path, synth_data)
    rep = train(o, model=model)
    run = tmp_path / "run"
    for f in ("model.yaml", "weights.pt", "report.json", "results.csv", "results.png", "last/train_state.pt"):
        assert (run / f).is_file(), f
    assert rep["final_epoch"] == 2 and "map50" in rep and rep["stage"] == "train"
    lines = (run / "results.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,box_loss") and len(lines) == 3
    # the run folder is itself an artifact another stage can load
    m = load_model(run)
    assert m.names == ["disc", "square", "triangle", "ring"]


class StopAfterFirstEpoch(Callback):
    def on_save(self, trainer, out_dir):
        if trainer.epoch == 0 and out_dir.name == "last":
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_exactly(tmp_path, synth_data):
    from compress.model.artifact import load_model

    a = opts(tmp_path / "a", synth_data)
    torch.manual_seed(0)
    train(a, model=load_model(tiny_cfg()))

    b = opts(tmp_path / "b", synth_data)
    save_options(b)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        train(b, [StopAfterFirstEpoch()], model=load_model(tiny_cfg()))
    rep = resume(tmp_path / "b" / "run")
    assert rep["final_epoch"] == 2
    wa, wb = weights(tmp_path / "a" / "run" / "last"), weights(tmp_path / "b" / "run" / "last")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_prepare(self, t):
        self.calls.append("prepare")

    def on_train_start(self, t):
        self.calls.append("start")

    def on_before_step(self, t):
        # gradients exist and are unscaled when this hook runs
        assert any(p.grad is not None for p in t.model.parameters())
        self.calls.append("step")

    def on_epoch_end(self, t, record):
        record["custom"] = 1.5
        self.calls.append("epoch")

    def on_train_end(self, t, report):
        report["custom_done"] = True
        self.calls.append("end")


def test_callbacks_are_called_in_order(tmp_path, synth_data):
    from compress.model.artifact import load_model

    r = Recorder()
    rep = train(opts(tmp_path, synth_data, epochs=1), [r], model=load_model(tiny_cfg()))
    assert r.calls[:2] == ["prepare", "start"] and r.calls[-2:] == ["epoch", "end"] and "step" in r.calls
    assert rep["custom_done"] is True
    assert "custom" in (tmp_path / "run" / "results.csv").read_text().splitlines()[0]


class PoisonWeights(Callback):
    def on_before_step(self, t):
        for p in t.model.parameters():
            p.data.fill_(float("nan"))


def test_non_finite_loss_stops_with_clear_error(tmp_path, synth_data):
    from compress.model.artifact import load_model

    with pytest.raises(UserError, match="non-finite"):
        train(opts(tmp_path, synth_data, epochs=1), [PoisonWeights()], model=load_model(tiny_cfg()))


def test_cli_train_then_finetune_and_bad_input(tmp_path, synth_data, tiny_cfg_file):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "compress.cli", *map(str, args)], capture_output=True, text=True)

    p = cli("train", "--cfg", tiny_cfg_file, "--data", synth_data, "--epochs", 1, "--imgsz", 64, "--batch", 8,
            "--workers", 0, "--out", tmp_path / "t")
    assert p.returncode == 0, p.stderr
    p = cli("train", "--weights", tmp_path / "t", "--data", synth_data, "--epochs", 1, "--imgsz", 64,
            "--batch", 8, "--workers", 0, "--out", tmp_path / "ft")
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert rep["parent"] == str(tmp_path / "t")
    for bad in (["--imgsz", 70], ["--epochs", 0], ["--data", tmp_path / "missing.yaml"]):
        args = ["train", "--cfg", tiny_cfg_file, "--data", synth_data, "--epochs", 1, "--imgsz", 64,
                "--out", tmp_path / "bad", *bad]
        p = cli(*args)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (bad, p.stderr)


def test_two_process_gloo_ddp(tmp_path, synth_data, tiny_cfg_file):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
            "-m", "compress.cli", "train", "--cfg", tiny_cfg_file, "--data", synth_data, "--epochs", 1,
            "--imgsz", 64, "--batch", 4, "--workers", 0, "--out", tmp_path / "ddp"]
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "ddp" / "weights.pt").is_file()
    assert "2 process(es)" in p.stdout


def test_val_cli_save_json_agrees_with_pycocotools(tmp_path, synth_data):
    """A real validation run: our mAP equals pycocotools' on the COCO JSON that `val --save-json` writes."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from compress.model.artifact import load_model

    torch.manual_seed(0)
    train(opts(tmp_path, synth_data, epochs=4, optimizer="AdamW", hyp="adamw-fast", nbs=8),
          model=load_model(tiny_cfg(width=0.25)))
    out = tmp_path / "val"
    p = subprocess.run([sys.executable, "-m", "compress.cli", "val", "--weights", str(tmp_path / "run"), "--data",
                        str(synth_data), "--imgsz", "64", "--workers", "0", "--save-json", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rep = json.loads((out / "report.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out / "ground_truth.json"))
        ev = COCOeval(gt, gt.loadRes(str(out / "predictions.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    print(f"\nmAP vs pycocotools: {abs(ev.stats[0] - rep['map']):.2e} {abs(ev.stats[1] - rep['map50']):.2e}")
    # equal up to float rounding: pycocotools reads the boxes back from JSON as x, y, w, h
    assert abs(ev.stats[0] - rep["map"]) < 1e-9 and abs(ev.stats[1] - rep["map50"]) < 1e-9
    assert rep["map50"] > 0  # a model that has learned something, so the comparison is not 0 == 0
    assert rep["metric"] == "coco" and rep["coco"]["map"] == rep["map"] and "map" in rep["ultralytics"]
    assert rep["nms_conf"] == 0.001 and 0 <= rep["f1_conf"] <= 1

    # val.py's definitions: the same predictions scored by ultralytics' metric on rectangular batches
    p = subprocess.run([sys.executable, "-m", "compress.cli", "val", "--weights", str(tmp_path / "run"), "--data",
                        str(synth_data), "--imgsz", "64", "--workers", "0", "--metric", "ultralytics", "--rect",
                        "--out", str(tmp_path / "val-ul")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    ul = json.loads((tmp_path / "val-ul" / "report.json").read_text())
    assert ul["metric"] == "ultralytics" and ul["map"] == ul["ultralytics"]["map"] and ul["rect"] is True
    assert "mAP: ultralytics val.py mAP, rectangular batches" in p.stdout


def _stop_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    from compress.engine.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    t = Trainer.__new__(Trainer)  # only what _all_ranks_stop reads
    t.world, t.device = world, torch.device("cpu")
    decided = t._all_ranks_stop(rank == 0)  # only rank 0 validates, so only it knows to stop
    with open(f"{out_file}.{rank}", "w") as f:
        f.write(str(decided))
    dist.destroy_process_group()


def test_early_stop_reaches_every_rank(tmp_path):
    """--patience under torchrun: rank 0's decision to stop is broadcast, so no rank trains on alone."""
    import torch.multiprocessing as mp

    mp.spawn(_stop_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "decided")), nprocs=2, join=True)
    assert [(tmp_path / f"decided.{r}").read_text() for r in (0, 1)] == ["True", "True"]
