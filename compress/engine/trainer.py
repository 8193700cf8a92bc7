"""The one training loop of compress: training from scratch, fine-tuning, sparsity training and QAT.

Stages differ only by callbacks (see :class:`Callback`): sparsity training adds a gradient term after
backward, QAT trains a fake-quantized twin of the model and decides what is saved, and so on. The loop
follows ultralytics YOLOv5 (SGD with nesterov momentum and three parameter groups, warmup, cosine or
linear LR, gradient accumulation to a nominal batch of 64, EMA, AMP on CUDA, validation every epoch) and
writes its output in the artifact format: the run folder holds the best weights (model.yaml, weights.pt,
report.json), ``last/`` the last epoch's plus ``train_state.pt`` to resume, ``results.csv`` and
``results.png``.
"""
from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from ..data.dataset import create_dataloader, load_data_yaml, load_hyp
from ..errors import UserError
from ..fileio import load_tensors, new_run_dir, save_torch, write_json, write_text, write_yaml
from ..log import warn
from ..model.artifact import load_model, read_report, save_model
from ..model.profile import check_imgsz, profile
from ..model.yolo import detect_head
from ..report import Report
from .config import OPTIMIZERS, Callback, TrainOptions  # noqa: F401  (re-exported: the trainer's config)
from .device import seed_everything, select_device  # noqa: F401  (select_device: re-exported)
from .loss import ComputeLoss, scale_hyp_for_model
from .metrics import fitness
from .validate import evaluate, torch_predictor

STATE = "train_state.pt"


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


def make_optimizer(name: str, groups, hyp):
    """SGD (nesterov, ``momentum``) or Adam/AdamW (beta1 = ``momentum``), as ultralytics builds them."""
    if name == "SGD":
        return torch.optim.SGD(groups, lr=hyp["lr0"], momentum=hyp["momentum"], nesterov=True)
    if name in ("Adam", "AdamW"):
        cls = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        return cls(groups, lr=hyp["lr0"], betas=(hyp["momentum"], 0.999))
    raise UserError(f"--optimizer {name}: choose one of {', '.join(OPTIMIZERS)}")


class Trainer:
    """One training run. Use :func:`train` unless a stage needs the object itself.

    ``model`` and ``data`` (a loaded data.yaml) may be given already checked (the train stage loads and
    checks them before anything is written); otherwise they are loaded from ``opts``.
    """

    def __init__(self, opts: TrainOptions, callbacks=(), model=None, data: dict | None = None):
        if opts.imgsz is None:
            opts = opts.replace(imgsz=opts.resolved_imgsz())
        self.opts = opts
        self.callbacks = list(callbacks)
        self.rank = int(os.environ.get("RANK", -1))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", -1))
        self.main = self.rank in (-1, 0)
        self.out = Path(opts.out) if opts.out else new_run_dir("train", opts.name)
        self.use_ema = all(cb.uses_ema for cb in self.callbacks)
        self.model = model
        self.hyp = load_hyp(opts.hyp)
        self.data = data if data is not None else load_data_yaml(opts.data)
        self.seconds_before = 0.0  # training time of the run before a resume

    # ----------------------------------------------------------------------------------------- setup
    def _setup(self, resume_state=None):
        o = self.opts
        o.validate()
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
        self.float_model = self.model  # what artifacts are written from; a callback may train another model
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
        for cb in self.callbacks:
            self.model = cb.train_model(self, self.model)
        self.aux = nn.ModuleDict()
        for cb in self.callbacks:
            self.aux.update(cb.aux_modules(self) or {})
        self.aux.to(self.device)
        self.aux_run = dict(self.aux.items())

        self.accumulate = max(round(o.nbs / (o.batch * self.world)), 1)
        wd = hyp["weight_decay"] * o.batch * self.world * self.accumulate / o.nbs
        self.optimizer = make_optimizer(o.optimizer, param_groups(nn.ModuleList([self.model, self.aux]), wd), hyp)
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
        self.start_epoch, self.best_fitness, self.best_epoch, self.history = 0, -1.0, 0, []
        if resume_state is not None:
            self._load_state(resume_state)
        if self.world > 1:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            self.aux_run = {k: nn.parallel.DistributedDataParallel(m, device_ids=ids) if any(
                p.requires_grad for p in m.parameters()) else m for k, m in self.aux.items()}
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
        self.t0 = time.time()
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
            mloss, mextra = torch.zeros(3), {}
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
                    extra = {}
                    for cb in self.callbacks:
                        term = cb.loss(self, imgs, pred)
                        if term is not None:
                            loss = loss + term[0]
                            extra.update(term[1])
                    if self.world > 1:
                        loss = loss * self.world
                if not torch.isfinite(loss):
                    raise UserError(
                        f"loss became non-finite at epoch {epoch + 1}, batch {i} (items {items.tolist()}"
                        f"{''.join(f', {k} {v:.4g}' for k, v in extra.items())}); "
                        f"the last good checkpoint is in {self.out / 'last'}; try a lower lr0 in --hyp")
                self.scaler.scale(loss).backward()
                if ni - last_opt_step >= self.accumulate_cur or i == nb - 1:
                    self.scaler.unscale_(self.optimizer)
                    # clip first, so that a callback's own gradient term (e.g. the sparsity L1) is not
                    # scaled down with the loss gradients
                    torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.aux.parameters()],
                                                   max_norm=10.0)
                    for cb in self.callbacks:
                        cb.on_before_step(self)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad()
                    if self.ema:
                        self.ema.update(self.model)
                    last_opt_step = ni
                mloss = (mloss * i + items.detach().cpu()) / (i + 1)
                for k, v in extra.items():
                    mextra[k] = (mextra.get(k, 0.0) * i + float(v)) / (i + 1)
                pbar.set_postfix(box=f"{mloss[0]:.4f}", obj=f"{mloss[1]:.4f}", cls=f"{mloss[2]:.4f}",
                                 **{k: f"{v:.4f}" for k, v in mextra.items()},
                                 inst=int(targets.shape[0]), size=imgs.shape[-1])
            pbar.close()
            self.scheduler.step()
            stop = False
            if self.main:
                self._end_epoch(epoch, mloss, mextra)
                stop = bool(o.patience and epoch - self.best_epoch >= o.patience)
                if stop:
                    print(f"stopping early: no improvement in {o.patience} epochs (best epoch {self.best_epoch + 1})")
            if self._all_ranks_stop(stop):
                break
        report = self._final_report(self.elapsed()) if self.main else {}
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return report

    def elapsed(self) -> float:
        """Training seconds of the whole run, the part before a resume included."""
        return self.seconds_before + (time.time() - self.t0)

    def _all_ranks_stop(self, stop: bool) -> bool:
        """Rank 0's early-stop decision, broadcast so that every torchrun process leaves the loop together."""
        if self.world == 1:
            return stop
        import torch.distributed as dist

        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

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

    def _end_epoch(self, epoch, mloss, mextra=None):
        o = self.opts
        final = epoch + 1 == o.epochs
        res = self.validate() if (final or (epoch + 1) % o.val_interval == 0) else None
        record = {"epoch": epoch + 1, "box_loss": float(mloss[0]), "obj_loss": float(mloss[1]),
                  "cls_loss": float(mloss[2]), **(mextra or {})}
        if res is not None:
            record.update(precision=res["precision"], recall=res["recall"], map50=res["map50"], map=res["map"])
        record.update({f"lr{j}": g["lr"] for j, g in enumerate(self.optimizer.param_groups)})
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        self.history.append(record)
        score = fitness(res) if res else -1
        if res is not None:
            print(f"epoch {epoch + 1}/{o.epochs}: P {res['precision']:.3f}  R {res['recall']:.3f}  "
                  f"mAP50 {res['map50']:.3f}  mAP50-95 {res['map']:.3f}")
        improved = score > self.best_fitness
        if improved:
            self.best_fitness, self.best_epoch = score, epoch
        self._save(epoch, improved, res)
        _write_results(self.out, self.history)

    def _report(self, metrics, epoch) -> Report:
        o = self.opts
        rep = Report(stage="train", imgsz=o.imgsz, gflops=profile(self.float_model, o.imgsz)["gflops"],
                     parent=str(Path(o.weights).absolute()) if o.weights else None,
                     options={k: v for k, v in o.to_dict().items() if k not in ("extra", "progress")} | o.extra,
                     details={"epoch": epoch + 1, "epochs": o.epochs,
                              "cfg": o.cfg if not isinstance(o.cfg, dict) else o.cfg.get("yaml_file")})
        if metrics:
            rep.set_metrics(metrics)
        return rep

    def _artifact_model(self):
        """The float model to write as an artifact: EMA weights when there is an EMA."""
        return self.ema.ema if self.ema else self.float_model

    def _artifact_contents(self) -> tuple:
        """``(state_dict or None, extra files)`` of an artifact: what the callbacks decide, else the float weights."""
        state, files = None, {}
        for cb in self.callbacks:
            sd, more = cb.artifact(self)
            state = sd if sd is not None else state
            files.update(more or {})
        return state, files

    def _save(self, epoch, improved, metrics):
        last = self.out / "last"
        model = self._artifact_model()
        state, files = self._artifact_contents()
        rep = self._report(metrics, epoch)
        save_model(model, last, rep, state_dict=state, extra_files=files)
        save_torch(self._state(epoch), last / STATE)
        for cb in self.callbacks:
            cb.on_save(self, last)
        if improved:
            save_model(model, self.out, rep, state_dict=state, extra_files=files)
            for cb in self.callbacks:
                cb.on_save(self, self.out)

    def _state(self, epoch) -> dict:
        """Everything needed to resume, as plain tensors and numbers (weights_only-loadable)."""
        st = {"epoch": epoch, "best_fitness": float(self.best_fitness), "best_epoch": int(self.best_epoch),
              "model": {k: v.detach().cpu() for k, v in de_parallel(self.model).state_dict().items()},
              "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
              "scaler": self.scaler.state_dict(), "history": self.history, "rng": torch.get_rng_state(),
              "seconds": float(self.elapsed())}
        if self.ema:
            st["ema"] = {k: v.detach().cpu() for k, v in self.ema.ema.state_dict().items()}
            st["ema_updates"] = self.ema.updates
        if len(self.aux):
            st["aux"] = {k: v.detach().cpu() for k, v in self.aux.state_dict().items()}
        return st

    def _load_state(self, st):
        de_parallel(self.model).load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        if self.ema and "ema" in st:
            self.ema.ema.load_state_dict(st["ema"])
            self.ema.updates = st["ema_updates"]
        if len(self.aux):
            if "aux" not in st:
                raise UserError(f"{self.out}: its train state holds no {', '.join(self.aux)} weights to resume "
                                f"(the run was started without them)")
            self.aux.load_state_dict(st["aux"])
        self.start_epoch = st["epoch"] + 1
        self.best_fitness, self.best_epoch = st["best_fitness"], st["best_epoch"]
        self.history = list(st["history"])
        if "scheduler" in st:
            self.scheduler.load_state_dict(st["scheduler"])
        else:  # states written before the scheduler was saved: the optimizer holds the LRs already
            self.scheduler.last_epoch = self.start_epoch
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.seconds_before = float(st.get("seconds", 0.0))
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
        write_json(self.out / "report.json", rep)
        print(f"done in {seconds / 60:.1f} min; best epoch {rep['best_epoch']}: "
              f"mAP50 {rep.get('map50') or 0:.3f} mAP50-95 {rep.get('map') or 0:.3f}; artifact: {self.out}")
        return rep


def _write_results(out: Path, history: list) -> None:
    keys = list(dict.fromkeys(k for r in history for k in r))
    lines = [",".join(keys)] + [",".join(_csv(r.get(k)) for k in keys) for r in history]
    write_text(out / "results.csv", "\n".join(lines) + "\n")
    try:
        plot_results(out / "results.png", history, title=str(out))
    except Exception as e:  # a plot must never stop training
        warn(f"could not plot results.png ({e})")


def _csv(v):
    return "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))


def plot_results(path, history, title: str | None = None) -> None:
    """Loss and mAP curves per epoch as a PNG (written atomically); ``title`` names the run."""
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
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train(opts: TrainOptions, callbacks=(), model=None, data: dict | None = None) -> dict:
    """Train (or fine-tune) a model; returns the final report (rank 0), writing the run folder."""
    return Trainer(opts, callbacks, model, data).fit()


def load_options(run_dir) -> TrainOptions:
    """The options a run folder's ``opt.yaml`` recorded (UserError when there is nothing to resume)."""
    import yaml

    run_dir = Path(run_dir)
    st_file, opt_file = run_dir / "last" / STATE, run_dir / "opt.yaml"
    if not st_file.is_file() or not opt_file.is_file():
        raise UserError(f"{run_dir}: nothing to resume (needs last/{STATE} and opt.yaml)")
    try:
        saved = yaml.safe_load(opt_file.read_text())
    except yaml.YAMLError:
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{opt_file}: unreadable (not the options of a compress train run)")
    known = {f.name for f in TrainOptions.option_fields(cli_only=False)}
    return TrainOptions(**{k: v for k, v in saved.items() if k in known}).replace(out=str(run_dir))


def resume(run_dir, callbacks=(), opts: TrainOptions | None = None) -> dict:
    """Continue an interrupted ``compress train`` run exactly where its last checkpoint left off.

    ``opts`` replaces the recorded options (the train stage passes them after checking what may change).
    """
    run_dir = Path(run_dir)
    opts = opts or load_options(run_dir)
    model = load_model(run_dir / "last")
    return Trainer(opts, callbacks, model).fit(resume_state=load_tensors(run_dir / "last" / STATE))


def save_options(opts: TrainOptions) -> None:
    """Write the run's options to ``opt.yaml`` (what ``--resume`` reads back), paths made absolute.

    Absolute paths let ``--resume`` work from any working directory.
    """
    d = opts.to_dict()
    for key in ("data", "weights", "hyp", "cfg", "out"):
        v = d.get(key)
        if isinstance(v, str) and (key in ("data", "weights", "out") or Path(v).exists()):
            d[key] = str(Path(v).absolute())
    write_yaml(Path(opts.out) / "opt.yaml", d)
