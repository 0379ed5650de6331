"""Train the model zoo: deterministic recipes, one zoo entry per name.

    python experiments/train.py --name resnet_a        # one entry of RECIPES
    python experiments/train.py --all                  # every entry, bases before fine-tunes
    python experiments/train.py --list                 # the recipes

Each run seeds torch and numpy, shuffles the data with a seeded generator in a single process,
trains with SGD (nesterov) or AdamW under a warm-up + cosine schedule, measures the accuracy on
the task's full test split and writes ``data/models/<name>.safetensors`` plus its entry in
``data/models/manifest.json`` (sha256, parameter count, accuracy, training time).  Fine-tuned
entries start from their base's checkpoint, which must exist (``--all`` orders them).
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout too

from pleas import zoo  # noqa: E402
from pleas.checkpoint import count_params, file_sha256, load_checkpoint, save_checkpoint  # noqa: E402
from pleas.data import load_task  # noqa: E402
from pleas.models import build_model  # noqa: E402

RESNET5 = {"num_classes": 5, "width": 1, "in_chans": 1}
RESNET10 = {"num_classes": 10, "width": 1, "in_chans": 1}
VIT5 = {"num_classes": 5}

_SGD = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "batch_size": 128}
_ADAMW = {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "batch_size": 128}
_FINETUNE = {"optimizer": "sgd", "lr": 0.02, "weight_decay": 5e-4, "batch_size": 64,
             "reinit_head": True}

RECIPES: dict[str, dict] = {
    "resnet_a": {"arch": "resnet20", "config": RESNET5, "task": "fashion_mnist:0-4", "seed": 1,
                 "base": None, "epochs": 3, "augment": "shift+flip", **_SGD},
    "resnet_b": {"arch": "resnet20", "config": RESNET5, "task": "fashion_mnist:5-9", "seed": 2,
                 "base": None, "epochs": 3, "augment": "shift+flip", **_SGD},
    "resnext_a": {"arch": "resnext29", "config": RESNET5, "task": "fashion_mnist:0-4", "seed": 21,
                  "base": None, "epochs": 3, "augment": "shift+flip", **_SGD},
    "resnext_b": {"arch": "resnext29", "config": RESNET5, "task": "fashion_mnist:5-9", "seed": 22,
                  "base": None, "epochs": 3, "augment": "shift+flip", **_SGD},
    "vit_a": {"arch": "vit_tiny28", "config": VIT5, "task": "fashion_mnist:0-4", "seed": 1,
              "base": None, "epochs": 8, "augment": "shift+flip", **_ADAMW},
    "vit_b": {"arch": "vit_tiny28", "config": VIT5, "task": "fashion_mnist:5-9", "seed": 2,
              "base": None, "epochs": 8, "augment": "shift+flip", **_ADAMW},
    "digits_base1": {"arch": "resnet20", "config": RESNET10, "task": "fashion_mnist", "seed": 3,
                     "base": None, "epochs": 1, "augment": "shift+flip", **_SGD},
    "digits_base2": {"arch": "resnet20", "config": RESNET10, "task": "fashion_mnist", "seed": 4,
                     "base": None, "epochs": 1, "augment": "shift+flip", **_SGD},
    "digits_a": {"arch": "resnet20", "config": RESNET10, "task": "mnist5k", "seed": 5,
                 "base": "digits_base1", "label_space": "digits", "epochs": 6,
                 "augment": "shift", **_FINETUNE},
    "digits_b": {"arch": "resnet20", "config": RESNET10, "task": "sklearn_digits", "seed": 6,
                 "base": "digits_base2", "label_space": "digits", "epochs": 15,
                 "augment": "shift", **_FINETUNE},
    # same-base pairs for the task-vector methods (pleas.task_vectors): ONE base, fine-tuned
    # twice.  The digit fine-tunes keep (and fine-tune) the base's 10-class head, so that the
    # head has a common starting point too; the Fashion-MNIST halves get new 5-class heads.
    "sb_base": {"arch": "resnet20", "config": RESNET10, "task": "fashion_mnist", "seed": 11,
                "base": None, "epochs": 1, "augment": "shift+flip", **_SGD},
    "sb_digits_a": {"arch": "resnet20", "config": RESNET10, "task": "mnist5k", "seed": 12,
                    "base": "sb_base", "label_space": "digits", "epochs": 4,
                    "augment": "shift", **_FINETUNE, "reinit_head": False},
    "sb_digits_b": {"arch": "resnet20", "config": RESNET10, "task": "sklearn_digits",
                    "seed": 13, "base": "sb_base", "label_space": "digits", "epochs": 10,
                    "augment": "shift", **_FINETUNE, "reinit_head": False},
    "sb_fmnist_a": {"arch": "resnet20", "config": RESNET5, "task": "fashion_mnist:0-4",
                    "seed": 14, "base": "sb_base", "epochs": 1, "limit_train": 10000,
                    "augment": "shift+flip", **_FINETUNE},
    "sb_fmnist_b": {"arch": "resnet20", "config": RESNET5, "task": "fashion_mnist:5-9",
                    "seed": 15, "base": "sb_base", "epochs": 1, "limit_train": 10000,
                    "augment": "shift+flip", **_FINETUNE},
    # experts for K-model merging (experiments/many.py): with resnet_a and resnet_b, four
    # ResNet-20s from four random initialisations on four tasks with their own label spaces
    "expert_mnist": {"arch": "resnet20", "config": RESNET10, "task": "mnist5k", "seed": 31,
                     "base": None, "epochs": 12, "augment": "shift", **_SGD},
    "expert_animal": {"arch": "resnet20", "config": RESNET10, "task": "animal_mnist",
                      "seed": 32, "base": None, "epochs": 8, "augment": "shift+flip", **_SGD},
}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augment(x: torch.Tensor, kinds: str, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random shifts of up to ``pad`` pixels (background-filled) and horizontal flips."""
    if "shift" in kinds:
        n, _, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)  # -1 = black after normalisation
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])
    if "flip" in kinds:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             device: str = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        out = model(images[i:i + batch_size].to(device))
        correct += int((out.argmax(1).cpu() == labels[i:i + batch_size]).sum())
    return 100.0 * correct / len(images)


def make_optimizer(model: torch.nn.Module, recipe: dict) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # no weight decay on norms, biases and ViT tokens / position embeddings
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=recipe["lr"], momentum=0.9, nesterov=True)
    if recipe["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=recipe["lr"], betas=(0.9, 0.999))
    raise ValueError(f"unknown optimizer {recipe['optimizer']!r}")


def train_one(name: str, out_dir: Path, device: str = "cpu", epochs: int | None = None,
              update_manifest: bool = True, limit_train: int | None = None) -> dict:
    recipe = dict(RECIPES[name])
    if epochs is not None:
        recipe["epochs"] = epochs
    seed_everything(recipe["seed"])
    train = load_task(recipe["task"], "train")
    if limit_train is None:  # a recipe may train on a stratified subset (cheap fine-tunes)
        limit_train = recipe.get("limit_train")
    if limit_train is not None:  # smoke runs: a stratified subset of the training split
        train = train.subset(limit_train, seed=recipe["seed"])
    test = load_task(recipe["task"], "test")

    if recipe["base"]:
        base_path = out_dir / f"{recipe['base']}.safetensors"
        base_config = RECIPES[recipe["base"]]["config"]
        model = load_checkpoint(base_path, recipe["arch"], base_config)
        if base_config != recipe["config"]:  # another class count: a new head (seeded above)
            model.fc = torch.nn.Linear(model.fc.in_features, recipe["config"]["num_classes"])
        elif recipe.get("reinit_head"):
            model.fc.reset_parameters()  # seeded above: the new head is deterministic
    else:
        model = build_model(recipe["arch"], **recipe["config"])
    model = model.to(device)

    gen = torch.Generator().manual_seed(recipe["seed"])
    bs = recipe["batch_size"]
    steps_per_epoch = math.ceil(len(train) / bs)
    total = recipe["epochs"] * steps_per_epoch
    warmup = min(200, total // 10)
    opt = make_optimizer(model, recipe)
    step = 0
    t0 = time.time()
    for epoch in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"{name} epoch {epoch + 1}/{recipe['epochs']}",
                   mininterval=2.0, file=sys.stderr)
        running = 0.0
        for b in bar:
            idx = order[b * bs:(b + 1) * bs]
            x = augment(train.images[idx], recipe["augment"], gen).to(device)
            y = train.labels[idx].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, recipe["lr"], warmup)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running = 0.9 * running + 0.1 * loss.item() if b else loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
        bar.close()
    seconds = time.time() - t0
    model.eval()
    acc = round(evaluate(model, test.images, test.labels, device), 2)
    print(f"{name}: test accuracy {acc:.2f}% on {len(test)} {recipe['task']} test images, "
          f"trained {recipe['epochs']} epochs in {seconds:.0f} s on {device}", flush=True)

    label_space = recipe.get("label_space", recipe["task"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    extra = {"name": name, "task": recipe["task"], "label_space": label_space,
             "classes": list(train.classes), "seed": recipe["seed"], "base": recipe["base"],
             "test_accuracy": acc}
    save_checkpoint(model.to("cpu"), path, recipe["arch"], recipe["config"], extra)
    entry = {
        "file": path.name, "arch": recipe["arch"], "config": recipe["config"],
        "task": recipe["task"], "label_space": label_space, "classes": list(train.classes),
        "seed": recipe["seed"], "base": recipe["base"], "test_accuracy": acc,
        "sha256": file_sha256(path), "params": count_params(model),
        "training": {"epochs": recipe["epochs"], "optimizer": recipe["optimizer"],
                     "lr": recipe["lr"], "batch_size": bs, "augment": recipe["augment"],
                     "train_images": len(train), "seconds": round(seconds, 1),
                     "device": device, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "machine": platform.machine()},
    }
    if update_manifest:
        zoo.update_manifest(name, entry, out_dir / "manifest.json")
    return entry


def ordered(names: list[str]) -> list[str]:
    """Bases before the models fine-tuned from them."""
    done: list[str] = []

    def visit(n: str) -> None:
        if n in done:
            return
        base = RECIPES[n]["base"]
        if base and base in names:
            visit(base)
        done.append(n)

    for n in names:
        visit(n)
    return done


def zoo_table(out_dir: Path) -> str:
    """The manifest as a markdown table (the README's "Model zoo" table)."""
    models = zoo.read_manifest(out_dir / "manifest.json")["models"]
    rows = ["| name | arch | task | classes | seed | base | test accuracy | params |",
            "|---|---|---|---|---|---|---|---|"]
    for n in ordered(list(RECIPES)) + sorted(set(models) - set(RECIPES)):
        if n not in models:
            continue
        e = models[n]
        rows.append(f"| `{n}` | {e['arch']} | `{e['task']}` | {len(e['classes'])} | {e['seed']} "
                    f"| {('`' + e['base'] + '`') if e['base'] else '-'} | "
                    f"{e['test_accuracy']:.2f}% | {e['params']:,} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", action="append", choices=sorted(RECIPES),
                    help="zoo entry to train (repeatable)")
    ap.add_argument("--all", action="store_true", help="train every recipe")
    ap.add_argument("--list", action="store_true", help="print the recipes and exit")
    ap.add_argument("--table", action="store_true",
                    help="print the manifest as the README's markdown table and exit")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (the committed zoo was trained with 1)")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    ap.add_argument("--limit-train", type=int, default=None,
                    help="train on a stratified subset of this many images (smoke runs)")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="output folder (default: the zoo folder, data/models)")
    args = ap.parse_args(argv)
    if args.list:
        for n, r in RECIPES.items():
            print(f"{n:13s} {r['arch']:10s} {r['task']:18s} seed {r['seed']} base {r['base']} "
                  f"{r['epochs']} epochs {r['optimizer']} lr {r['lr']}")
        return 0
    if args.table:
        print(zoo_table(args.out_dir or zoo.zoo_dir()))
        return 0
    names = sorted(RECIPES) if args.all else (args.name or [])
    if not names:
        ap.error("give --name NAME (repeatable), --all or --list")
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or zoo.zoo_dir()
    t0 = time.time()
    for n in ordered(names):
        train_one(n, out_dir, args.device, args.epochs, limit_train=args.limit_train)
    print(f"done: {len(names)} model(s) in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
