"""The one training loop of compress: training from scratch, fine-tuning, sparsity training and QAT.

Stages differ only by callbacks (see :class:`Callback`): sparsity training adds a gradient term after
backward, QAT swaps the model for a fake-quantized one on prepare, and so on. The loop follows
ultralytics YOLOv5 (SGD with nesterov momentum and three parameter groups, warmup, cosine or linear LR,
gradient accumulation to a nominal batch of 64, EMA, AMP on CUDA, validation every epoch) and writes
its output in the artifact format: the run folder holds the best weights (model.yaml, weights.pt,
report.json), ``last/`` the last epoch's plus ``train_state.pt`` to resume, ``results.csv`` and
``results.png``.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..data.dataset import create_dataloader, load_data_yaml, load_hyp
from ..errors import UserError
from ..fileio import load_tensors, save_torch, write_text, write_yaml
from ..model.artifact import load_model, read_report, save_model
from ..model.profile import check_imgsz, profile
from ..model.yolo import detect_head
from .loss import ComputeLoss, scale_hyp_for_model
from .validate import evaluate, torch_predictor

STATE = "train_state.pt"


@dataclass
class TrainOptions:
    """What ``compress train`` takes; every field has the CLI flag of the same name."""

    data: str = ""
    cfg: str | None = None
    weights: str | None = None
    epochs: int = 100
    imgsz: int = 320
    batch: int = 16
    hyp: str | dict | None = None
    device: str = "cpu"
    workers: int = 2
    out: str = "runs/train/exp"
    seed: int = 0
    cos_lr: bool = False
    nbs: int = 64
    optimizer: str = "SGD"
    sync_bn: bool = False
    patience: int = 0
    val_interval: int = 1
    max_val_images: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)  # options of the callbacks, recorded in the report


class Callback:
    """Hooks into :class:`Trainer`; override the ones a stage needs. All receive the trainer."""

    def on_prepare(self, trainer):
        """After the model is built and moved to its device, before the optimizer exists (QAT swaps it here)."""

    def on_train_start(self, trainer):
        """After the optimizer, loaders and EMA exist."""

    def on_before_step(self, trainer):
        """After backward (gradients unscaled and clipped) and before each optimizer step."""

    def on_epoch_end(self, trainer, record: dict):
        """After validation; ``record`` is the results.csv row (add keys to log more)."""

    def on_save(self, trainer, out_dir: Path):
        """After an artifact is written (``out_dir`` is the run folder or ``last/``)."""

    def on_train_end(self, trainer, report: dict):
        """After training; ``report`` is the final report.json content (may be extended)."""


def select_device(device: str) -> torch.device:
    """``cpu``, ``0``, ``cuda:0``... -> torch.device; a CUDA device without CUDA is a UserError."""
    d = str(device).strip().lower()
    if d in ("", "cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(d if d.startswith("cuda") else f"cuda:{d.split(',')[0]}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ModelEMA:
    """Exponential moving average of weights and buffers, decay ramping up as ultralytics' (tau 2000)."""

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = self.decay(self.updates)
        msd = de_parallel(model).state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)


def de_parallel(model):
    """The plain model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def param_groups(model, weight_decay: float):
    """Three SGD groups: conv/linear weights (decay), BN weights (no decay), biases (no decay).

    Parameters a callback marks with ``no_decay=True`` (e.g. quantizer scales) go with the biases.
    """
    decay, bn, bias = [], [], []
    seen = set()
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if getattr(p, "no_decay", False) or name == "bias":
                bias.append(p)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) or p.dim() <= 1:
                bn.append(p)
            else:
                decay.append(p)
    return [{"params": bias, "weight_decay": 0.0, "name": "bias"},
            {"params": decay, "weight_decay": weight_decay, "name": "weights"},
            {"params": bn, "weight_decay": 0.0, "name": "bn"}]


OPTIMIZERS = ("SGD", "Adam", "AdamW")


def make_optimizer(name: str, groups, hyp):
    """SGD (nesterov, ``momentum``) or Adam/AdamW (beta1 = ``momentum``), as ultralytics builds them."""
    if name == "SGD":
        return torch.optim.SGD(groups, lr=hyp["lr0"], momentum=hyp["momentum"], nesterov=True)
    if name in ("Adam", "AdamW"):
        cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        return cls(groups, lr=hyp["lr0"], betas=(hyp["momentum"], 0.999))
    raise UserError(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")


class Trainer:
    """One training run. Use :func:`train` unless a stage needs the object itself."""

    def __init__(self, opts: TrainOptions, callbacks=(), model=None):
        self.opts = opts
        self.callbacks = list(callbacks)
        self.rank = int(os.environ.get("RANK", -1))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", -1))
        self.main = self.rank in (-1, 0)
        self.out = Path(opts.out)
        self.use_ema = True
        self.model = model
        self.hyp = load_hyp(opts.hyp)
        self.data = load_data_yaml(opts.data)

    # ----------------------------------------------------------------------------------------- setup
    def _setup(self, resume_state=None):
        o = self.opts
        if o.epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {o.epochs}")
        if o.batch < 1:
            raise UserError(f"--batch must be >= 1, got {o.batch}")
        self.device = select_device(o.device)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(backend)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
        seed_everything(o.seed + max(self.rank, 0))
        if self.model is None:
            if not o.cfg and not o.weights:
                raise UserError("give --cfg MODEL.yaml (train from scratch) or --weights W (fine-tune)")
            self.model = load_model(o.cfg, o.weights) if o.weights else load_model(o.cfg, nc=self.data["nc"])
        if self.model.nc != self.data["nc"]:
            raise UserError(f"{o.data}: nc={self.data['nc']} but the model predicts {self.model.nc} classes "
                            f"(train from --cfg with the dataset's nc, or use matching weights)")
        self.model.names = list(self.data["names"])
        check_imgsz(self.model, o.imgsz)
        self.model.to(self.device)
        self.float_model = self.model  # what artifacts are written from (QAT swaps self.model)
        hyp = self.hyp
        self.train_loader, self.train_set = create_dataloader(
            self.data["train"], o.imgsz, o.batch, augment=True, hyp=hyp, workers=o.workers, shuffle=True,
            seed=o.seed, rank=self.rank, world_size=self.world, nc=self.data["nc"], prefix="train: ")
        if self.main:
            val_files = self.data["val"][: o.max_val_images] if o.max_val_images else self.data["val"]
            self.val_loader, _ = create_dataloader(
                val_files, o.imgsz, o.batch * 2, augment=False, hyp=hyp, workers=o.workers, shuffle=False,
                nc=self.data["nc"], prefix="val: ")
        for cb in self.callbacks:
            cb.on_prepare(self)

        self.accumulate = max(round(o.nbs / (o.batch * self.world)), 1)
        wd = hyp["weight_decay"] * o.batch * self.world * self.accumulate / o.nbs
        self.optimizer = make_optimizer(o.optimizer, param_groups(self.model, wd), hyp)
        lrf = hyp["lrf"]
        if o.cos_lr:
            self.lf = lambda x: ((1 - math.cos(x * math.pi / o.epochs)) / 2) * (lrf - 1) + 1
        else:
            self.lf = lambda x: (1 - x / o.epochs) * (1.0 - lrf) + lrf
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=self.lf)

        self.loss_fn = ComputeLoss(de_parallel(self.model),
                                   scale_hyp_for_model(hyp, detect_head(self.model).nl, self.data["nc"], o.imgsz))
        if o.sync_bn and self.world > 1 and self.device.type != "cuda":
            raise UserError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on CPU)")
        if o.sync_bn and self.world > 1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = ModelEMA(self.model) if (self.main and self.use_ema) else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        self.start_epoch, self.best_fitness, self.history = 0, -1.0, []
        if resume_state is not None:
            self._load_state(resume_state)
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        for cb in self.callbacks:
            cb.on_train_start(self)

    # ----------------------------------------------------------------------------------------- loop
    def fit(self, resume_state=None) -> dict:
        """Train for ``opts.epochs`` epochs (from a resume state if given); returns the final report."""
        self._setup(resume_state)
        o, hyp = self.opts, self.hyp
        nb = len(self.train_loader)
        nw = max(round(hyp["warmup_epochs"] * nb), 100) if hyp["warmup_epochs"] > 0 else 0
        last_opt_step = -1
        self.accumulate_cur = self.accumulate
        t0 = time.time()
        if self.main:
            print(f"training {o.epochs} epochs at {o.imgsz}px, batch {o.batch} x {self.world} process(es), "
                  f"accumulate {self.accumulate}, {len(self.train_set)} train images -> {self.out}")
        for epoch in range(self.start_epoch, o.epochs):
            self.epoch = epoch
            self.model.train()
            if hasattr(self.train_loader.sampler, "set_epoch"):
                self.train_loader.sampler.set_epoch(epoch)
            if hasattr(self.train_set, "set_epoch"):
                self.train_set.set_epoch(epoch)
            mloss = torch.zeros(3)
            pbar = tqdm(enumerate(self.train_loader), total=nb, disable=not (self.main and o.progress),
                        dynamic_ncols=True, desc=f"{epoch + 1}/{o.epochs}")
            self.optimizer.zero_grad()
            for i, (imgs, targets, _, _) in pbar:
                ni = i + nb * epoch
                imgs = imgs.to(self.device, non_blocking=True).float() / 255
                if ni <= nw:
                    self._warmup(ni, nw, epoch)
                with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                    pred = self.model(imgs)
                    loss, items = self.loss_fn(pred, targets.to(self.device))
                    if self.world > 1:
                        loss = loss * self.world
                if not torch.isfinite(loss):
                    raise UserError(
                        f"loss became non-finite at epoch {epoch + 1}, batch {i} (items {items.tolist()}); "
                        f"the last good checkpoint is in {self.out / 'last'}; try a lower lr0 in --hyp")
                self.scaler.scale(loss).backward()
                if ni - last_opt_step >= self.accumulate_cur or i == nb - 1:
                    self.scaler.unscale_(self.optimizer)
                    # clip first, so that a callback's own gradient term (e.g. the sparsity L1) is not
                    # scaled down with the loss gradients
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
                    for cb in self.callbacks:
                        cb.on_before_step(self)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad()
                    if self.ema:
                        self.ema.update(self.model)
                    last_opt_step = ni
                mloss = (mloss * i + items.detach().cpu()) / (i + 1)
                pbar.set_postfix(box=f"{mloss[0]:.4f}", obj=f"{mloss[1]:.4f}", cls=f"{mloss[2]:.4f}",
                                 inst=int(targets.shape[0]), size=imgs.shape[-1])
            pbar.close()
            self.scheduler.step()
            if self.main:
                self._end_epoch(epoch, mloss)
                if o.patience and epoch - self.best_epoch >= o.patience:
                    print(f"stopping early: no improvement in {o.patience} epochs (best epoch {self.best_epoch + 1})")
                    break
        report = self._final_report(time.time() - t0) if self.main else {}
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return report

    def _warmup(self, ni, nw, epoch):
        hyp, xi = self.hyp, [0, nw]
        self.accumulate_cur = max(1, int(np.interp(ni, xi, [1, self.accumulate]).round()))
        for j, g in enumerate(self.optimizer.param_groups):
            start = hyp["warmup_bias_lr"] if j == 0 else 0.0
            g["lr"] = float(np.interp(ni, xi, [start, g["initial_lr"] * self.lf(epoch)]))
            mom = float(np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]]))
            if "betas" in g:
                g["betas"] = (mom, g["betas"][1])
            else:
                g["momentum"] = mom

    # ----------------------------------------------------------------------------------------- epoch end
    def eval_model(self):
        """The model to validate and save: the EMA when there is one, else the trained model itself."""
        return self.ema.ema if self.ema else de_parallel(self.model)

    def validate(self, model=None) -> dict:
        """Validate ``model`` (default: :meth:`eval_model`) on the val split; returns the metrics."""
        model = model or self.eval_model()
        was_training = model.training
        res = evaluate(torch_predictor(model, self.device), self.val_loader, self.data["nc"],
                       self.data["names"], progress=self.opts.progress)
        model.train(was_training)
        return res

    def _end_epoch(self, epoch, mloss):
        o = self.opts
        final = epoch + 1 == o.epochs
        res = self.validate() if (final or (epoch + 1) % o.val_interval == 0) else None
        record = {"epoch": epoch + 1, "box_loss": float(mloss[0]), "obj_loss": float(mloss[1]),
                  "cls_loss": float(mloss[2])}
        if res is not None:
            record.update(precision=res["precision"], recall=res["recall"], map50=res["map50"], map=res["map"])
        record.update({f"lr{j}": g["lr"] for j, g in enumerate(self.optimizer.param_groups)})
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        self.history.append(record)
        fitness = 0.1 * record.get("map50", 0) + 0.9 * record.get("map", 0) if res else -1
        if res is not None:
            print(f"epoch {epoch + 1}/{o.epochs}: P {res['precision']:.3f}  R {res['recall']:.3f}  "
                  f"mAP50 {res['map50']:.3f}  mAP50-95 {res['map']:.3f}")
        improved = fitness > self.best_fitness
        if improved:
            self.best_fitness, self.best_epoch = fitness, epoch
        elif not hasattr(self, "best_epoch"):
            self.best_epoch = epoch
        self._save(epoch, improved, res)
        _write_results(self.out, self.history)

    def _report(self, metrics, epoch):
        o = self.opts
        rep = {"stage": "train", "epoch": epoch + 1, "epochs": o.epochs, "imgsz": o.imgsz,
               "gflops": profile(self.float_model, o.imgsz)["gflops"],
               "parent": str(o.weights) if o.weights else None, "cfg": o.cfg,
               "options": {k: v for k, v in asdict(o).items() if k not in ("extra", "progress")} | o.extra}
        if metrics:
            rep.update(map50=metrics["map50"], map=metrics["map"], precision=metrics["precision"],
                       recall=metrics["recall"])
        return rep

    def _artifact_model(self):
        """The float model to write as an artifact: EMA weights when there is an EMA."""
        return self.ema.ema if self.ema else self.float_model

    def _save(self, epoch, improved, metrics):
        last = self.out / "last"
        model = self._artifact_model()
        save_model(model, last, self._report(metrics, epoch))
        save_torch(self._state(epoch), last / STATE)
        for cb in self.callbacks:
            cb.on_save(self, last)
        if improved:
            save_model(model, self.out, self._report(metrics, epoch))
            for cb in self.callbacks:
                cb.on_save(self, self.out)

    def _state(self, epoch) -> dict:
        """Everything needed to resume, as plain tensors and numbers (weights_only-loadable)."""
        st = {"epoch": epoch, "best_fitness": float(self.best_fitness), "best_epoch": int(self.best_epoch),
              "model": {k: v.detach().cpu() for k, v in de_parallel(self.model).state_dict().items()},
              "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
              "history": self.history, "rng": torch.get_rng_state()}
        if self.ema:
            st["ema"] = {k: v.detach().cpu() for k, v in self.ema.ema.state_dict().items()}
            st["ema_updates"] = self.ema.updates
        return st

    def _load_state(self, st):
        de_parallel(self.model).load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        if self.ema and "ema" in st:
            self.ema.ema.load_state_dict(st["ema"])
            self.ema.updates = st["ema_updates"]
        self.start_epoch = st["epoch"] + 1
        self.best_fitness, self.best_epoch = st["best_fitness"], st["best_epoch"]
        self.history = list(st["history"])
        for _ in range(self.start_epoch):
            self.scheduler.step()
        torch.set_rng_state(st["rng"])
        if self.start_epoch >= self.opts.epochs:
            raise UserError(f"{self.out}: training already finished ({self.opts.epochs} epochs); nothing to resume")
        print(f"resuming {self.out} from epoch {self.start_epoch + 1}/{self.opts.epochs}")

    def _final_report(self, seconds):
        rep = read_report(self.out)
        rep["train_seconds"] = round(seconds, 1)
        rep["best_epoch"] = self.best_epoch + 1
        rep["final_epoch"] = self.history[-1]["epoch"] if self.history else 0
        for cb in self.callbacks:
            cb.on_train_end(self, rep)
        from ..fileio import write_json

        write_json(self.out / "report.json", rep)
        print(f"done in {seconds / 60:.1f} min; best epoch {rep['best_epoch']}: "
              f"mAP50 {rep.get('map50', 0):.3f} mAP50-95 {rep.get('map', 0):.3f}; artifact: {self.out}")
        return rep


def _write_results(out: Path, history: list) -> None:
    keys = list(dict.fromkeys(k for r in history for k in r))
    lines = [",".join(keys)] + [",".join(_csv(r.get(k)) for k in keys) for r in history]
    write_text(out / "results.csv", "\n".join(lines) + "\n")
    try:
        plot_results(out / "results.png", history)
    except Exception as e:  # a plot must never stop training
        print(f"warning: could not plot results.png ({e})")


def _csv(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


def plot_results(path, history) -> None:
    """Loss and mAP curves per epoch as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_path

    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(1, 4, figsize=(14, 3.2))
    for a, key in zip(ax[:3], ("box_loss", "obj_loss", "cls_loss")):
        a.plot(ep, [r[key] for r in history], marker=".")
        a.set_title(key)
    for key in ("map50", "map"):
        pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if pts:
            ax[3].plot(*zip(*pts), marker=".", label={"map50": "mAP@0.5", "map": "mAP@0.5:0.95"}[key])
    ax[3].set_title("val mAP")
    ax[3].legend()
    for a in ax:
        a.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train(opts: TrainOptions, callbacks=(), model=None) -> dict:
    """Train (or fine-tune) a model; returns the final report (rank 0), writing the run folder."""
    return Trainer(opts, callbacks, model).fit()


def resume(run_dir, callbacks=()) -> dict:
    """Continue an interrupted ``compress train`` run exactly where its last checkpoint left off."""
    run_dir = Path(run_dir)
    st_file, opt_file = run_dir / "last" / STATE, run_dir / "opt.yaml"
    if not st_file.is_file() or not opt_file.is_file():
        raise UserError(f"{run_dir}: nothing to resume (needs last/{STATE} and opt.yaml)")
    import yaml

    saved = yaml.safe_load(opt_file.read_text())
    opts = TrainOptions(**{k: v for k, v in saved.items() if k in TrainOptions.__dataclass_fields__})
    opts.out = str(run_dir)
    model = load_model(run_dir / "last")
    return Trainer(opts, callbacks, model).fit(resume_state=load_tensors(st_file))


def save_options(opts: TrainOptions) -> None:
    """Write the run's options to ``opt.yaml`` (what ``--resume`` reads back)."""
    write_yaml(Path(opts.out) / "opt.yaml", asdict(opts))
