"""Train one of Kiln's models: `kiln train NAME` or `python -m kiln.training.train NAME`.

Reads top to bottom like the PyTorch examples: data, one epoch, evaluation, main. The product
is a bare state_dict (loadable with weights_only=True) and a meta.json beside it; a checkpoint
with the optimiser state lets --resume continue an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln import declaration
from kiln.console import setup_logging
from kiln.training import data, recipes
from kiln.workspace import Workspace

log = logging.getLogger("kiln.train")
# Read, never written: the checkout whose commit a run records (none when Kiln is installed).
CODE = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    name: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    augment: bool
    seed: int
    device: str
    out: Path
    log_dir: Path
    resume: bool
    dry_run: bool
    models_dirs: list[Path] = field(default_factory=list)


def git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=CODE, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=CODE, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def loss_and_score(decl, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The training loss and, per batch, the number of right answers (classification) or the
    summed squared error (regression)."""
    kind = decl.output["kind"]
    if kind == "regression":
        predicted = output.reshape(y.shape)
        loss = nn.functional.mse_loss(predicted, y)
        return loss, float(((predicted - y) ** 2).sum())
    if kind == "binary":
        p = output.squeeze(1)
        if decl.activation == "sigmoid":  # the model returns a logit
            loss = nn.functional.binary_cross_entropy_with_logits(p, y.float())
            p = torch.sigmoid(p)
        else:
            loss = nn.functional.binary_cross_entropy(p, y.float())
        return loss, int(((p >= 0.5).long() == y).sum())
    loss = nn.functional.cross_entropy(output, y)
    return loss, int((output.argmax(1) == y).sum())


def train_epoch(decl, model, loader, optimizer, device, augment=None, max_batches=None):
    model.train()
    total_loss, score, seen = 0.0, 0.0, 0
    for i, (*xs, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        xs, y = [x.to(device) for x in xs], y.to(device)
        if augment is not None:
            xs[0] = augment(xs[0])
        optimizer.zero_grad()
        loss, ok = loss_and_score(decl, model(*xs), y)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        score += ok
        seen += len(y)
    return total_loss / seen, _metric(decl, score, seen)


@torch.no_grad()
def evaluate(decl, model, loader, device, max_batches=None):
    model.eval()
    total_loss, score, seen = 0.0, 0.0, 0
    for i, (*xs, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        xs, y = [x.to(device) for x in xs], y.to(device)
        loss, ok = loss_and_score(decl, model(*xs), y)
        total_loss += loss.item() * len(y)
        score += ok
        seen += len(y)
    return total_loss / seen, _metric(decl, score, seen)


def _metric(decl, score: float, seen: int) -> float:
    """Accuracy, or for regression the negative mean squared error: higher is better."""
    return -score / seen if decl.output["kind"] == "regression" else score / seen


@torch.no_grad()
def regression_metrics(model, inputs, y) -> dict:
    """Test MAE and R-squared of a regression model, in the target's own units."""
    model.eval()
    predicted = model(*inputs).reshape(y.shape).double()
    y = y.double()
    mae = float((predicted - y).abs().mean())
    r2 = 1.0 - float(((predicted - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return {"test_mae": mae, "test_r2": r2}


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig) -> dict:
    decl = declaration.get(cfg.name, cfg.models_dirs)
    if decl.recipe is None:
        raise SystemExit(f"{decl.name} brings its own weights ({decl.state_dict}): "
                         "Kiln trains only models whose declaration names a recipe")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    prepared = recipes.prepare(decl)
    splits, background = prepared.splits, prepared.background
    shuffle = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        TensorDataset(*splits["train"][0], splits["train"][1]), batch_size=cfg.batch_size,
        shuffle=True, generator=shuffle
    )
    val_loader = DataLoader(TensorDataset(*splits["val"][0], splits["val"][1]), batch_size=512)
    test_loader = DataLoader(TensorDataset(*splits["test"][0], splits["test"][1]),
                             batch_size=512)
    augment = None
    if cfg.augment and background is not None:
        aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
        augment = lambda x: data.random_affine(x, aug_gen, background)

    _keep_trained_weights(cfg)
    model = decl.build().to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    # Cosine decay to zero over the run: the last epochs polish rather than jump.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = cfg.out / "checkpoint.pt"
    # Classifiers are picked on validation accuracy, regressors on validation MSE (negated:
    # higher is better for both).
    metric = "neg_mse" if decl.output["kind"] == "regression" else "accuracy"
    start_epoch, best, history = 1, {f"val_{metric}": -math.inf}, []
    best_state = None
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        shuffle.set_state(ckpt["shuffle_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, best, history = ckpt["epoch"] + 1, ckpt["best"], ckpt["history"]
        best_state = ckpt["best_state"]
        log.info("resumed %s from epoch %d", cfg.name, ckpt["epoch"])
    elif cfg.resume:
        log.warning("--resume: no checkpoint at %s, starting from scratch", ckpt_path)

    writer = _summary_writer(cfg)
    max_batches = 1 if cfg.dry_run else None
    last_epoch = start_epoch if cfg.dry_run else cfg.epochs
    for epoch in range(start_epoch, last_epoch + 1):
        started = time.perf_counter()
        tr_loss, tr_acc = train_epoch(
            decl, model, train_loader, optimizer, device, augment, max_batches
        )
        va_loss, va_acc = evaluate(decl, model, val_loader, device, max_batches)
        scheduler.step()
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "train_loss": tr_loss, f"train_{metric}": tr_acc,
                        "val_loss": va_loss, f"val_{metric}": va_acc, "seconds": seconds})
        log.info("%s epoch %d/%d  train loss %.4f %s %.4f  val loss %.4f %s %.4f  %.1fs",
                 cfg.name, epoch, last_epoch, tr_loss, metric, tr_acc, va_loss, metric, va_acc,
                 seconds)
        for tag, value in (("loss/train", tr_loss), ("loss/val", va_loss),
                           (f"{metric}/train", tr_acc), (f"{metric}/val", va_acc)):
            writer.add_scalar(tag, value, epoch)
        if va_acc >= best[f"val_{metric}"]:  # model selection on validation, never on test
            best = {f"val_{metric}": va_acc, "val_loss": va_loss, "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "shuffle_rng": shuffle.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch, "best": best,
                    "best_state": best_state, "history": history}, ckpt_path)
    writer.close()

    model.load_state_dict(best_state)
    te_loss, te_acc = evaluate(decl, model, test_loader, device, max_batches)
    if decl.output["kind"] == "regression":
        metrics = regression_metrics(model, splits["test"][0], splits["test"][1])
    else:
        metrics = {"test_accuracy": te_acc}
    torch.save(best_state, cfg.out / "state_dict.pt")
    meta = {
        "name": cfg.name,
        "model_class": decl.model_class().__name__,
        "recipe": decl.recipe,
        "hyperparameters": {k: v for k, v in asdict(cfg).items()
                            if k not in ("name", "out", "log_dir", "resume", "models_dirs")},
        "inputs": prepared.inputs,
        "output": prepared.output,
        "metrics": {**metrics, "test_loss": te_loss, **{
            f"best_{k}": v for k, v in best.items()}},
        **({"baseline": prepared.baseline} if prepared.baseline else {}),
        "split_sizes": prepared.split_sizes,
        "history": history,
        "data_sha256": prepared.sha256,
        "seed": cfg.seed,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "device": str(device),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (cfg.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s test %s (best val %s %.4f at epoch %d) -> %s", cfg.name,
             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), metric, best[f"val_{metric}"],
             best["epoch"], cfg.out / "state_dict.pt")
    return meta


def _keep_trained_weights(cfg: TrainConfig) -> None:
    """A dry run's one-batch model must never replace a full run's weights: the next kiln
    serve would export and serve it."""
    weights, meta = cfg.out / "state_dict.pt", cfg.out / "meta.json"
    if not cfg.dry_run or not weights.exists():
        return
    if meta.exists() and json.loads(meta.read_text())["hyperparameters"].get("dry_run"):
        return
    raise SystemExit(f"--dry-run: {cfg.out} holds the weights of a full run; a smoke run "
                     f"writes elsewhere (leave out --out: {dry_run_folder(cfg.name)})")


def dry_run_folder(name: str) -> Path:
    """Where a dry run writes by default: beside the weights kiln serve exports, never on them."""
    return Workspace.current().exports(name) / "dry-run"


def _summary_writer(cfg: TrainConfig):
    from torch.utils.tensorboard import SummaryWriter

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return SummaryWriter(log_dir=str(cfg.log_dir / cfg.name / stamp))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="model to train: a declared name or a NAME.toml path")
    declaration.add_models_dir(parser)
    parser.add_argument("--epochs", type=int,
                        help="epochs (default: the declaration's [train] epochs)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: model's)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the model's)")
    parser.add_argument("--optimizer", choices=["sgd", "adam", "rmsprop"],
                        help="optimiser (default: the model's, adam)")
    parser.add_argument("--momentum", type=float, help="momentum for sgd/rmsprop (default: 0.9)")
    parser.add_argument("--weight-decay", type=float, help="L2 weight decay (default: 0)")
    parser.add_argument("--no-augment", action="store_true",
                        help="turn off random affine augmentation of images (default: on)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto = cuda when present (default: auto)")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: the workspace's artifacts/NAME; with "
                             "--dry-run artifacts/NAME/dry-run)")
    parser.add_argument("--log-dir", type=Path,
                        help="TensorBoard log root (default: the workspace's runs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt (default: start afresh)")
    parser.add_argument("--dry-run", action="store_true",
                        help="one batch of one epoch: a smoke test that never replaces a full "
                             "run's weights (default: off)")


# What a declaration's [train] table may leave out.
TRAIN_DEFAULTS = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "optimizer": "adam",
                  "momentum": 0.9, "weight_decay": 0.0, "augment": False}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    decl = declaration.get(args.name, args.models_dirs)
    if args.name != decl.name:  # given as a path: its folder is where the name is declared
        args.models_dirs = [*args.models_dirs, decl.folder]
    d = argparse.Namespace(**{**TRAIN_DEFAULTS, **decl.train})

    def pick(value, default):
        return default if value is None else value

    return TrainConfig(
        name=decl.name,
        epochs=pick(args.epochs, d.epochs),
        batch_size=pick(args.batch_size, d.batch_size),
        lr=pick(args.lr, d.lr),
        optimizer=pick(args.optimizer, d.optimizer),
        momentum=pick(args.momentum, d.momentum),
        weight_decay=pick(args.weight_decay, d.weight_decay),
        augment=d.augment and not args.no_augment,
        seed=args.seed,
        device=args.device,
        out=args.out or (dry_run_folder(decl.name) if args.dry_run
                         else Workspace.current().exports(decl.name)),
        log_dir=args.log_dir or Workspace.current().tensorboard,
        resume=args.resume,
        dry_run=args.dry_run,
        models_dirs=list(args.models_dirs),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def config_for(argv: list[str]) -> TrainConfig:
    """The configuration `kiln train ARGV...` would run (defaults from the declaration)."""
    return config_from_args(build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The command for parsed arguments (shared by `python -m` and `kiln train`)."""
    train(config_from_args(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
