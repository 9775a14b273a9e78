"""Quality against training time: callbacks that judge a model while it trains on the built-in shapes.

A generative model is judged by its samples, not its loss. These callbacks pause training every
`every_steps` optimizer steps (or every `every_minutes` of training wall time), measure the model with the attribute classifier (a judge only:
nothing here feeds a gradient) and append one row per measurement to ``<run>/quality.csv``:

- `PromptFollowingProbe` (text-to-image models): fixed captions of the validation split (colour-shape
  pairs seen in training) and of the test split (held-out pairs, words never seen together), each in the
  canonical template and as typed prompts (the same scenes, words left out, synonyms, case), are sampled
  with one fixed sampler (DPM-Solver++(2M), 20 steps, guidance 3 by default) from the EMA weights, with
  fixed seeds; rows hold the all-attribute and per-attribute match and the Fréchet distance in the
  classifier's feature space against real images of the same split.
- `ReconstructionProbe` (first stages): PSNR, SSIM and the share of shapes / colours / every attribute the
  classifier still reads correctly in reconstructions of fixed held-out images.

The clock is training wall time: time since the fit started minus the time the probes themselves took
(data loading, validation and checkpointing count as training). It is kept in the callback's state, so a
run resumed with ``-r`` continues its curve. A last measurement is taken when training ends. With
`max_train_minutes` the probe also ends training once that much training time has passed (its measurements left
out, which a Trainer's ``max_time`` would count): a recipe given a time budget.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from ldm.data.shapes import ShapesTest, ShapesValidation, scene_attributes
from ldm.evaluation.attribute_classifier import AttributeClassifier, attribute_accuracy, load_attribute_classifier
from ldm.evaluation.frechet import feature_statistics, frechet_distance_from_statistics
from ldm.evaluation.prompt_following import prompt_match
from ldm.evaluation.reconstruction import dataset_images, reconstruct, reconstruction_metrics

log = logging.getLogger(__name__)

MATCH_COLUMNS = ("all", "shape", "colour", "size", "position", "num_objects")
PROMPT_SETS = ("seen", "held_out", "seen_typed", "held_out_typed")


class TimedProbe(Callback):
    """Calls `measure` every `every_steps` steps or `every_minutes` of training time, and at the end; writes
    rows to a CSV. A step interval makes runs comparable when other work shares the CPU. `max_train_minutes`
    stops training after that much training time (module docstring)."""

    columns: tuple[str, ...] = ()

    def __init__(self, every_minutes: Optional[float] = 2.0, every_steps: Optional[int] = None,
                 csv_name: str = "quality.csv", label: str = "", classifier_path: Optional[str] = None,
                 max_train_minutes: Optional[float] = None) -> None:
        super().__init__()
        if max_train_minutes is not None and not max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be positive, got {max_train_minutes}")
        self.max_train_seconds = math.inf if max_train_minutes is None else 60.0 * max_train_minutes
        if every_steps is not None:
            if every_steps < 1:
                raise ValueError(f"every_steps must be a positive integer, got {every_steps}")
            every_minutes = None
        elif every_minutes is None or not every_minutes > 0:
            raise ValueError(f"every_minutes must be positive, got {every_minutes}")
        self.every_steps = every_steps
        self.every_seconds = math.inf if every_minutes is None else 60.0 * every_minutes
        self.csv_name = csv_name
        self.label = label
        self.classifier_path = classifier_path
        self.classifier: Optional[AttributeClassifier] = None
        self.train_seconds = 0.0  # training wall time before this fit (restored on resume)
        self.next_due = self.every_seconds
        self._fit_start = 0.0
        self._probe_seconds = 0.0  # spent measuring in this fit
        self._last_step = -1

    # -------------------------------------------------------------------------------- clock and state

    def elapsed(self) -> float:
        return self.train_seconds + time.perf_counter() - self._fit_start - self._probe_seconds

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.elapsed() if self._fit_start else self.train_seconds,
                "next_due": self.next_due}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = float(state_dict["train_seconds"])
        self.next_due = float(state_dict["next_due"])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._probe_seconds = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_steps is not None:
            if trainer.global_step % self.every_steps == 0:
                self._run(trainer, pl_module)
        elif self.elapsed() >= self.next_due:
            self._run(trainer, pl_module)
            while self.next_due <= self.elapsed():
                self.next_due += self.every_seconds
        if self.elapsed() >= self.max_train_seconds:
            log.info(f"[probe] {self.max_train_seconds / 60:.1f} training minutes reached at step "
                     f"{trainer.global_step}: stopping")
            trainer.should_stop = True  # on_train_end takes the last measurement

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.interrupted:
            self._run(trainer, pl_module)

    # -------------------------------------------------------------------------------- measuring

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._last_step:
            return
        start = time.perf_counter()
        minutes = self.elapsed() / 60.0
        if self.classifier is None:
            self.classifier = load_attribute_classifier(self.classifier_path, device=pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        try:
            rows = self.measure(pl_module)
        finally:
            pl_module.train(was_training)
        self._last_step = trainer.global_step
        path = Path(trainer.default_root_dir) / self.csv_name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(("label", "step", "train_minutes", "split", *self.columns))
            for split, values in rows.items():
                writer.writerow((self.label, trainer.global_step, f"{minutes:.2f}", split,
                                 *(_fmt(values[c]) for c in self.columns)))
        self._probe_seconds += time.perf_counter() - start
        summary = "; ".join(f"{split}: " + ", ".join(f"{c} {_fmt(v[c])}" for c in self.columns[:4])
                            for split, v in rows.items())
        log.info(f"[probe] step {trainer.global_step}, {minutes:.1f} train min: {summary} "
                 f"({time.perf_counter() - start:.0f} s)")

    def measure(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        raise NotImplementedError


class PromptFollowingProbe(TimedProbe):
    """Samples fixed seen-pair and held-out-pair captions and scores them (module docstring)."""

    columns = (*(f"match_{c}" for c in MATCH_COLUMNS), "fid")

    def __init__(self, n_captions: int = 128, n_real: int = 1024, sampler: str = "dpmpp_2m", steps: int = 20,
                 scale: float = 3.0, seed: int = 0, batch_size: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_captions, self.n_real = n_captions, n_real
        self.sampler, self.steps, self.scale, self.seed, self.batch_size = sampler, steps, scale, seed, batch_size
        self._splits: Optional[dict[str, tuple[list[str], tuple]]] = None

    def _prompt_sets(self, size: int) -> dict[str, tuple[list[str], tuple]]:
        """Per split: the captions to sample and the real images' feature statistics."""
        if self._splits is None:
            self._splits = {split: (captions, stats) for split, (captions, _, stats)
                            in prompt_sets(self.classifier, self.n_captions, self.n_real, size).items()}
        return self._splits

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        from ldm.inference import downsampling_factor, text_to_image  # imports the model classes

        size = pl_module.image_size * downsampling_factor(pl_module)
        rows = {}
        with pl_module.ema_scope():
            for split, (captions, real_stats) in self._prompt_sets(size).items():
                images = torch.cat([
                    text_to_image(pl_module, captions[s:s + self.batch_size], scale=self.scale, sampler=self.sampler,
                                  steps=self.steps, seed=self.seed + s, progress=False)
                    for s in range(0, len(captions), self.batch_size)])
                match = prompt_match(self.classifier, images.to(self.classifier.head.weight.device), captions)
                features = self.classifier.features(images.to(self.classifier.head.weight.device))
                fid = frechet_distance_from_statistics(*feature_statistics(features), *real_stats)
                rows[split] = {**{f"match_{c}": match[c] for c in MATCH_COLUMNS}, "fid": fid}
        return rows


class ReconstructionProbe(TimedProbe):
    """PSNR, SSIM and what the classifier still reads in reconstructions of fixed held-out images."""

    columns = ("psnr", "ssim", "keep_shape", "keep_colour", "keep_all")

    def __init__(self, n_images: int = 1024, size: int = 32, batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_images, self.size, self.batch_size = n_images, size, batch_size

    @torch.no_grad()
    def measure(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        return {"held_out": reconstruction_quality(pl_module, self.classifier, self.n_images, self.size,
                                                   self.batch_size, progress=False)}


@torch.no_grad()
def prompt_sets(classifier: AttributeClassifier, n_captions: int, n_real: int, size: int = 32,
                ) -> dict[str, tuple[list[str], torch.Tensor, tuple]]:
    """Per prompt set: the first `n_captions` captions, their real images, and the classifier-feature statistics
    (mean, covariance) of the first `n_real` real images of the split. ``seen`` (validation: colour-shape pairs
    seen in training) and ``held_out`` (test) hold the canonical captions; ``seen_typed`` and ``held_out_typed``
    the same items' typed phrasings (`ldm.data.captions.typed_caption`: words left out, synonyms, case, ...)."""
    sets = {}
    device = classifier.head.weight.device
    for split, dataset in (("seen", ShapesValidation), ("held_out", ShapesTest)):
        data = dataset(size=size, num_samples=max(n_captions, n_real))
        features = torch.cat([classifier.features(dataset_images(data, s, min(s + 256, n_real)).to(device))
                              for s in range(0, n_real, 256)])
        images, stats = dataset_images(data, 0, n_captions), feature_statistics(features)
        items = [data[i] for i in range(n_captions)]
        sets[split] = ([item["caption"] for item in items], images, stats)
        sets[f"{split}_typed"] = ([item["typed_caption"] for item in items], images, stats)
    return {name: sets[name] for name in PROMPT_SETS}


@torch.no_grad()
def real_image_scores(classifier: AttributeClassifier, n_captions: int = 128, n_real: int = 1024,
                      ) -> dict[str, dict[str, float]]:
    """The probe's figures for the real images of its captions: the ceiling of the match and the floor of the
    FID at this sample count (a FID from 128 samples is biased upwards; compare runs at one count)."""
    rows = {}
    for split, (captions, images, real_stats) in prompt_sets(classifier, n_captions, n_real).items():
        images = images.to(classifier.head.weight.device)
        match = prompt_match(classifier, images, captions)
        fid = frechet_distance_from_statistics(*feature_statistics(classifier.features(images)), *real_stats)
        rows[split] = {**{f"match_{c}": match[c] for c in MATCH_COLUMNS}, "fid": fid}
    return rows


@torch.no_grad()
def reconstruction_quality(model: torch.nn.Module, classifier: AttributeClassifier, n_images: int = 1024,
                           size: int = 32, batch_size: int = 256, progress: bool = True) -> dict[str, float]:
    """PSNR/SSIM of a first stage on `n_images` validation images, and the share of their objects whose
    shape / colour (and images whose every attribute) the classifier reads the same as the true labels."""
    data = ShapesValidation(size=size, num_samples=n_images)
    device = next(model.parameters()).device
    batches = [dataset_images(data, s, min(s + batch_size, n_images)) for s in range(0, n_images, batch_size)]
    metrics = reconstruction_metrics(model, batches, progress=progress)
    recon = torch.cat([reconstruct(model, b.to(device)) for b in batches])
    # The labels come from the scenes: reading them from the items would render every image a second time.
    scenes = [data.scene(i) for i in range(n_images)]
    target = {"attributes": torch.stack([torch.as_tensor(scene_attributes(scene)) for scene in scenes]),
              "num_objects": torch.tensor([len(scene.objects) for scene in scenes])}
    read = attribute_accuracy(classifier.predict(recon.to(classifier.head.weight.device)), target)
    return {"psnr": metrics["psnr"], "ssim": metrics["ssim"], "keep_shape": read["shape"],
            "keep_colour": read["colour"], "keep_all": read["all"]}


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"
