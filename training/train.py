"""Train one of Kiln's models: `kiln train NAME` or `python -m kiln.training.train NAME`.

Reads top to bottom like the PyTorch examples: data, one epoch, evaluation, main. The product
is a bare state_dict (loadable with weights_only=True) and a meta.json beside it; a checkpoint
with the optimiser state lets --resume continue an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln.console import setup_logging
from kiln.training import data, registry

log = logging.getLogger("kiln.train")
REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "artifacts"


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


def git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def prepare(spec: registry.ModelSpec, ds: data.Dataset):
    """Tensors for each split and the preprocessing a server must repeat (for the signature)."""
    if spec.dataset == "mnist":
        mean, std = data.image_stats(ds.train)
        pre = {"image_size": [28, 28], "pad": spec.pad, "pixel_max": 255, "mean": mean, "std": std}
        to_tensor = lambda x: data.image_tensor(x, spec.pad, mean, std)
        background = (0.0 - mean) / std
    else:
        mean_v, std_v = data.feature_stats(ds.train)
        pre = {"feature_names": ds.feature_names, "mean": mean_v, "std": std_v}
        to_tensor = lambda x: data.feature_tensor(x, mean_v, std_v)
        background = None
    splits = {
        part: (to_tensor(getattr(ds, part).x), torch.from_numpy(getattr(ds, part).y))
        for part in ("train", "val", "test")
    }
    return splits, pre, background


def loss_and_correct(spec, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    if spec.output_kind == "binary":
        p = output.squeeze(1)
        loss = nn.functional.binary_cross_entropy(p, y.float())
        correct = int(((p >= 0.5).long() == y).sum())
    else:
        loss = nn.functional.cross_entropy(output, y)
        correct = int((output.argmax(1) == y).sum())
    return loss, correct


def train_epoch(spec, model, loader, optimizer, device, augment=None, max_batches=None):
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        if augment is not None:
            x = augment(x)
        optimizer.zero_grad()
        loss, ok = loss_and_correct(spec, model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        correct += ok
        seen += len(y)
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(spec, model, loader, device, max_batches=None):
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        loss, ok = loss_and_correct(spec, model(x), y)
        total_loss += loss.item() * len(y)
        correct += ok
        seen += len(y)
    return total_loss / seen, correct / seen


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
    spec = registry.get(cfg.name)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    ds = data.load(spec.dataset)
    splits, preprocess, background = prepare(spec, ds)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        TensorDataset(*splits["train"]), batch_size=cfg.batch_size, shuffle=True, generator=shuffle
    )
    val_loader = DataLoader(TensorDataset(*splits["val"]), batch_size=512)
    test_loader = DataLoader(TensorDataset(*splits["test"]), batch_size=512)
    augment = None
    if cfg.augment and background is not None:
        aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
        augment = lambda x: data.random_affine(x, aug_gen, background)

    model = spec.build().to(device)
    optimizer = make_optimizer(cfg, model.parameters())
    # Cosine decay to zero over the run: the last epochs polish rather than jump.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = cfg.out / "checkpoint.pt"
    start_epoch, best, history = 1, {"val_accuracy": -1.0}, []
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
            spec, model, train_loader, optimizer, device, augment, max_batches
        )
        va_loss, va_acc = evaluate(spec, model, val_loader, device, max_batches)
        scheduler.step()
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "train_loss": tr_loss, "train_accuracy": tr_acc,
                        "val_loss": va_loss, "val_accuracy": va_acc, "seconds": seconds})
        log.info("%s epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  %.1fs",
                 cfg.name, epoch, last_epoch, tr_loss, tr_acc, va_loss, va_acc, seconds)
        for tag, value in (("loss/train", tr_loss), ("loss/val", va_loss),
                           ("accuracy/train", tr_acc), ("accuracy/val", va_acc)):
            writer.add_scalar(tag, value, epoch)
        if va_acc >= best["val_accuracy"]:  # model selection on validation, never on test
            best = {"val_accuracy": va_acc, "val_loss": va_loss, "epoch": epoch}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "shuffle_rng": shuffle.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch, "best": best,
                    "best_state": best_state, "history": history}, ckpt_path)
    writer.close()

    model.load_state_dict(best_state)
    te_loss, te_acc = evaluate(spec, model, test_loader, device, max_batches)
    torch.save(best_state, cfg.out / "state_dict.pt")
    meta = {
        "name": cfg.name,
        "model_class": spec.model_class().__name__,
        "hyperparameters": {k: v for k, v in asdict(cfg).items()
                            if k not in ("name", "out", "log_dir", "resume")},
        "preprocess": preprocess,
        "labels": ds.labels,
        "metrics": {"test_accuracy": te_acc, "test_loss": te_loss, **{
            f"best_{k}": v for k, v in best.items()}},
        "split_sizes": {p: len(getattr(ds, p).y) for p in ("train", "val", "test")},
        "history": history,
        "data_sha256": ds.sha256,
        "seed": cfg.seed,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "device": str(device),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (cfg.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s test accuracy %.4f (best val %.4f at epoch %d) -> %s",
             cfg.name, te_acc, best["val_accuracy"], best["epoch"], cfg.out / "state_dict.pt")
    return meta


def _summary_writer(cfg: TrainConfig):
    from torch.utils.tensorboard import SummaryWriter

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return SummaryWriter(log_dir=str(cfg.log_dir / cfg.name / stamp))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(registry.REGISTRY), help="model to train")
    parser.add_argument("--epochs", type=int, help="epochs (default: the model's, see registry)")
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
                        help="output folder (default: artifacts/NAME)")
    parser.add_argument("--log-dir", type=Path, default=REPO_ROOT / "runs",
                        help="TensorBoard log root (default: runs/)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt (default: start afresh)")
    parser.add_argument("--dry-run", action="store_true",
                        help="one batch of one epoch: a smoke test (default: off)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    d = registry.get(args.name).defaults

    def pick(value, default):
        return default if value is None else value

    return TrainConfig(
        name=args.name,
        epochs=pick(args.epochs, d.epochs),
        batch_size=pick(args.batch_size, d.batch_size),
        lr=pick(args.lr, d.lr),
        optimizer=pick(args.optimizer, d.optimizer),
        momentum=pick(args.momentum, d.momentum),
        weight_decay=pick(args.weight_decay, d.weight_decay),
        augment=d.augment and not args.no_augment,
        seed=args.seed,
        device=args.device,
        out=args.out or ARTIFACTS / args.name,
        log_dir=args.log_dir,
        resume=args.resume,
        dry_run=args.dry_run,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def config_for(argv: list[str]) -> TrainConfig:
    """The configuration `kiln train ARGV...` would run (defaults from the registry)."""
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
