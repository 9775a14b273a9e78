"""Train the shapes attribute classifier (a few minutes on a CPU) and report held-out accuracy.

    python scripts/train_attribute_classifier.py --steps 3000 --batch-size 128 --out models/attribute_classifier

Trains on fresh images of ``ldm.data.shapes`` every step, then prints per-attribute accuracy on real
held-out images: the `validation` split and the compositional `test` split (images holding the
colour-shape pairs that generative models never see in training). Writes the weights and
``config.json`` to --out and the figures to bench/results/attribute_classifier.json.

The classifier is the judge of whether a generative model composed an unseen pair, so it must read
those pairs itself: it trains on every pair (every 4th training image comes from the `test` split's
generator). Trained on the `train` split alone it does not compose: it reads held-out pairs as seen
ones (about 54% shape and 77% colour accuracy on the test split, against 100% on validation). Its
training images use seeds offset by DATA_SEED_OFFSET, so they never coincide with the images that
configs and evaluations draw with small seeds.

The judge of fine-tuning a trained model on new shapes and colours (issue 26; bench/fine_tuning.py) knows them too:

    python scripts/train_attribute_classifier.py --extra-shapes heart --extra-colours white

trains on the same stream with every 4th image from the extended data instead (`ShapesDataset(extra_shapes=...,
extra_colours=...)`: each such image holds a new shape or colour), evaluates on it as well (``novel``: the extended
`validation` split) and writes models/attribute_classifier_extended/ and
bench/results/attribute_classifier_extended.json, leaving the shipped classifier alone. It is a judge only: nothing
trains on its outputs.
"""

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.shapes import ShapesDataset  # noqa: E402
from ldm.evaluation.attribute_classifier import (  # noqa: E402
    AttributeClassifier,
    attribute_accuracy,
    attribute_loss,
    save_attribute_classifier,
)

REPO = Path(__file__).resolve().parents[1]
DATA_SEED_OFFSET = 1_000_000


EXTENDED_NAME = "attribute_classifier_extended"  # --out and --results of a classifier with new shapes or colours


class AllPairsStream(Dataset):
    """Every 4th item from the `test` split (held-out pairs), the others from the `train` split; with new shapes or
    colours, every 4th of the others (index 1 mod 4) from the extended `train` split (a new one in each image)."""

    def __init__(self, num_samples: int, seed: int, extra_shapes: Sequence[str] = (),
                 extra_colours: Sequence[str] = ()) -> None:
        self.seen = ShapesDataset("train", num_samples=num_samples, seed=seed)
        self.held_out = ShapesDataset("test", num_samples=num_samples, seed=seed)
        self.novel = None
        if extra_shapes or extra_colours:
            self.novel = ShapesDataset("train", num_samples=num_samples, seed=seed, extra_shapes=extra_shapes,
                                       extra_colours=extra_colours)

    def __len__(self) -> int:
        return len(self.seen)

    def __getitem__(self, index: int) -> dict:
        # Index i of either split is its own random stream, so sharing indices repeats nothing.
        if self.novel is not None and index % 4 == 1:
            return self.novel[index]
        return (self.held_out if index % 4 == 3 else self.seen)[index]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps (each on fresh images)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for attribute_classifier.safetensors and config.json (default "
                             f"models/attribute_classifier, or models/{EXTENDED_NAME} with new shapes or colours)")
    parser.add_argument("--results", type=Path, default=None,
                        help="the figures' JSON (default bench/results/attribute_classifier.json, or "
                             f"bench/results/{EXTENDED_NAME}.json with new shapes or colours)")
    parser.add_argument("--extra-shapes", nargs="*", default=[], metavar="SHAPE",
                        help="new shapes the classifier also reads (from ldm.data.shape_attributes.EXTRA_SHAPES)")
    parser.add_argument("--extra-colours", nargs="*", default=[], metavar="COLOUR",
                        help="new colours the classifier also reads (from ldm.data.shape_attributes.EXTRA_COLOURS)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights and (plus DATA_SEED_OFFSET) of the training images")
    parser.add_argument("--eval-seed", type=int, default=0,
                        help="dataset seed of the held-out validation / test images (the configs' default)")
    parser.add_argument("--eval-samples", type=int, default=4000, help="images per evaluation split")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                        help="data loader processes (default: the cores left after the training process)")
    args = parser.parse_args()
    name = EXTENDED_NAME if args.extra_shapes or args.extra_colours else "attribute_classifier"
    args.out = args.out or REPO / "models" / name
    args.results = args.results or REPO / "bench" / "results" / f"{name}.json"
    return args


def augment(images: torch.Tensor) -> torch.Tensor:
    """Mild noise and blur, so the classifier also reads imperfect (generated) images."""
    n = images.shape[0]
    noise_std = torch.rand(n, 1, 1, 1, device=images.device) * 0.05
    noisy = images + noise_std * torch.randn_like(images)
    # A 3x3 binomial blur on ~30% of the images.
    kernel = torch.tensor([1.0, 2.0, 1.0], device=images.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(noisy, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = torch.rand(n, 1, 1, 1, device=images.device) < 0.3
    return torch.where(blur, blurred, noisy).clamp(-1.0, 1.0)


def to_nchw(batch: dict) -> torch.Tensor:
    return batch["image"].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(model: AttributeClassifier, split: str, args: argparse.Namespace,
             extras: Optional[dict[str, list[str]]] = None) -> dict[str, float]:
    """Accuracy on `split`'s held-out images (`extras`: the extended data's, new shapes or colours in each)."""
    dataset = ShapesDataset(split, num_samples=args.eval_samples, seed=args.eval_seed, **(extras or {}))
    loader = DataLoader(dataset, batch_size=256, num_workers=args.num_workers)
    preds, targets = [], []
    for batch in tqdm(loader, desc=f"evaluating {split}", leave=False):
        preds.append(model.predict(to_nchw(batch).to(args.device)))
        targets.append({"attributes": batch["attributes"], "num_objects": batch["num_objects"]})
    merged_pred = {k: torch.cat([p[k].cpu() for p in preds]) for k in ("attributes", "num_objects")}
    merged_target = {k: torch.cat([t[k] for t in targets]) for k in ("attributes", "num_objects")}
    return attribute_accuracy(merged_pred, merged_target)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    extras = {"extra_shapes": args.extra_shapes, "extra_colours": args.extra_colours}
    model = AttributeClassifier(**extras).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    # One image per step slot: the model never sees an image twice, so there is nothing to overfit.
    train = AllPairsStream(args.steps * args.batch_size, seed=DATA_SEED_OFFSET + args.seed, **extras)
    loader = DataLoader(train, batch_size=args.batch_size, num_workers=args.num_workers,
                        persistent_workers=args.num_workers > 0)
    model.train()
    start = time.time()
    progress = tqdm(loader, total=args.steps, desc="training")
    for step, batch in enumerate(progress):
        images = augment(to_nchw(batch).to(device))
        loss = attribute_loss(model(images), batch["attributes"].to(device), batch["num_objects"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
    train_seconds = time.time() - start
    model.eval()
    accuracy = {split: evaluate(model, split, args) for split in ("validation", "test")}
    if args.extra_shapes or args.extra_colours:
        accuracy["novel"] = evaluate(model, "validation", args, extras)
    for split, figures in accuracy.items():
        print(f"{split:>10}: " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items()))

    params = sum(p.numel() for p in model.parameters())
    run = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "eval_seed": args.eval_seed, "eval_samples": args.eval_samples, "device": str(device),
           "train_seconds": round(train_seconds, 1), "parameters": params,
           **({k: v for k, v in extras.items() if v})}
    save_attribute_classifier(model.cpu(), args.out, extra={"training": run, "accuracy": accuracy})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({**run, "accuracy": accuracy}, indent=2) + "\n")
    print(f"saved {args.out} ({params} parameters, trained {train_seconds:.0f} s); figures in {args.results}")


if __name__ == "__main__":
    main()
