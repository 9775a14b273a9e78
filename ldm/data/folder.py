"""Train on your own images: a folder of images with optional captions or class sub-folders.

Layouts (``root`` is searched recursively; files are taken in sorted order):

- captions beside the images (``caption_source: txt``): ``root/cat.png`` + ``root/cat.txt``;
- one metadata file as in Hugging Face ``imagefolder`` (``caption_source: jsonl`` or ``csv``):
  ``root/metadata.jsonl`` with lines ``{"file_name": "cat.png", "text": "a cat"}``, or
  ``root/metadata.csv`` with header ``file_name,text``. ``file_name`` is relative to the folder that
  holds the metadata file; a metadata file may also sit in a sub-folder, for the images under it;
- classes from sub-folder names (``class_from_subfolders: true``): ``root/cat/*.png``,
  ``root/dog/*.png``; classes are the sorted sub-folder names (``dataset.classes``), labels their index.

``caption_source: auto`` picks ``jsonl``, then ``csv`` (when such a metadata file exists), then
``txt`` (when any image has a ``.txt`` beside it), else ``none``. With ``none`` the caption is the class
name (underscores as spaces) when classes come from sub-folders, else the empty string.

Images are converted to RGB, resized so the shorter side is ``size`` and cropped to ``size`` x ``size``
(``center`` or ``random``); ``size: null`` keeps the stored size. With ``flip_p`` > 0 images are mirrored
left-right at random, so turn it off when captions say "left" or "right". Random crops and flips use
torch's global generator, which Lightning seeds and each DataLoader worker reseeds.

A corrupt or unreadable image is reported once (a warning naming the file) and skipped: the item falls
through to the next readable image, so a long run is not stopped by one bad file.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset

from ldm.data.image_transform import UNREADABLE_IMAGE_ERRORS, ImageTransform, load_rgb
from ldm.util import read_utf8

CAPTION_SOURCES = ("auto", "txt", "jsonl", "csv", "none")
DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = {"jsonl": "metadata.jsonl", "csv": "metadata.csv"}


def _list_missing(paths: Sequence[Path], root: Path, limit: int = 5) -> str:
    shown = ", ".join(str(p.relative_to(root)) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _read_jsonl(path: Path, caption_column: str) -> list[tuple[str, str]]:
    rows = []
    for line_number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({e}); write one JSON object per line") from e
        if not isinstance(record, dict) or "file_name" not in record or caption_column not in record:
            raise ValueError(
                f"{path}, line {line_number}: each line needs the keys 'file_name' and '{caption_column}', "
                f"got {line.strip()[:120]}"
            )
        rows.append((str(record["file_name"]), str(record[caption_column])))
    return rows


def _read_csv(path: Path, caption_column: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    columns = reader.fieldnames or []
    if "file_name" not in columns or caption_column not in columns:
        raise ValueError(f"{path}: needs a header with columns 'file_name' and '{caption_column}', found {columns}")
    return [(row["file_name"], row[caption_column]) for row in reader]


METADATA_READERS = {"jsonl": _read_jsonl, "csv": _read_csv}


class NoReadableImages(FileNotFoundError):
    """Every image of a folder is unreadable: nothing to train on."""


class ImageFolderDataset(Dataset):
    """Images (and captions or class labels) from a folder; see the module docstring for layouts.

    Item keys: ``image`` (size, size, 3) float32 in [-1, 1], ``caption`` str, ``class_label`` int (0
    without class sub-folders), ``human_label`` (the class sub-folder's name, or ""), ``file_path_`` str
    (the image actually returned) and ``index`` int (that image's position in the sorted file list: a
    stable key, e.g. for `cache_latents`).
    """

    def __init__(
        self,
        root: str,
        size: Optional[int] = 256,
        caption_source: str = "auto",
        class_from_subfolders: bool = False,
        crop: str = "center",
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        caption_column: str = "text",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}; set 'root' to a directory of images")
        if caption_source not in CAPTION_SOURCES:
            raise ValueError(f"unknown caption_source {caption_source!r}: use one of {CAPTION_SOURCES}")
        self.transform = ImageTransform(size, crop, interpolation, flip_p)
        self.size = size
        self.crop = crop
        self.flip_p = flip_p
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)

        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in self.extensions)
        if not self.paths:
            raise ValueError(
                f"no images with extensions {self.extensions} found under {self.root}; add images or set "
                "'extensions' to match the files there"
            )
        self.classes, self.labels = self._class_labels(class_from_subfolders)
        self.caption_source = self._resolve_caption_source(caption_source)
        self.captions = self._captions(caption_column, class_from_subfolders)
        # Shared memory: DataLoader workers mark what they skip where the training process (and the other workers)
        # see it, for the per-epoch report (`skipped_files`, ldm.callbacks.SkippedImages).
        self._unreadable = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    # ------------------------------------------------------------------ indexing the folder

    def _class_labels(self, class_from_subfolders: bool) -> tuple[list[str], list[int]]:
        if not class_from_subfolders:
            return [self.root.name], [0] * len(self.paths)
        loose = [p for p in self.paths if p.parent == self.root]
        if loose:
            raise ValueError(
                f"class_from_subfolders is set but {len(loose)} image(s) sit directly in {self.root} "
                f"({_list_missing(loose, self.root)}); move each image into a sub-folder named after its class"
            )
        classes = sorted({p.relative_to(self.root).parts[0] for p in self.paths})
        index = {name: i for i, name in enumerate(classes)}
        return classes, [index[p.relative_to(self.root).parts[0]] for p in self.paths]

    def _resolve_caption_source(self, caption_source: str) -> str:
        if caption_source != "auto":
            return caption_source
        for kind, name in METADATA_FILES.items():
            if any(self.root.rglob(name)):
                return kind
        return "txt" if any(p.with_suffix(".txt").is_file() for p in self.paths) else "none"

    def _captions(self, caption_column: str, class_from_subfolders: bool) -> list[str]:
        if self.caption_source == "none":
            if class_from_subfolders:
                return [self.classes[label].replace("_", " ") for label in self.labels]
            return [""] * len(self.paths)
        if self.caption_source == "txt":
            missing = [p for p in self.paths if not p.with_suffix(".txt").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"caption_source 'txt' needs a .txt file beside every image, but {len(missing)} have none "
                    f"({_list_missing(missing, self.root)}); write e.g. {missing[0].with_suffix('.txt').name} "
                    "with the caption, or use caption_source 'none' to train without captions"
                )
            return [read_utf8(p.with_suffix(".txt")).strip() for p in self.paths]
        return self._metadata_captions(self.caption_source, caption_column)

    def _metadata_captions(self, kind: str, caption_column: str) -> list[str]:
        name = METADATA_FILES[kind]
        metadata_files = sorted(self.root.rglob(name))
        if not metadata_files:
            raise FileNotFoundError(
                f"caption_source '{kind}' needs {self.root / name} (columns 'file_name' and '{caption_column}', "
                "as in Hugging Face imagefolder); create it or choose another caption_source"
            )
        by_path: dict[Path, str] = {}
        for metadata in metadata_files:
            for file_name, caption in METADATA_READERS[kind](metadata, caption_column):
                image_path = (metadata.parent / file_name).resolve()
                if not image_path.is_file():
                    raise FileNotFoundError(f"{metadata} lists {file_name!r}, which does not exist at {image_path}")
                by_path[image_path] = caption
        missing = [p for p in self.paths if p.resolve() not in by_path]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) have no entry in {name} ({_list_missing(missing, self.root)}); "
                "add a line for each, or remove the images"
            )
        return [by_path[p.resolve()] for p in self.paths]

    # ------------------------------------------------------------------ items

    @property
    def random_augmentation(self) -> bool:
        """Whether an item's pixels vary between visits (random crop or flips): then they cannot be cached."""
        return self.transform.random_augmentation

    def __len__(self) -> int:
        return len(self.paths)

    def skipped_files(self) -> list[Path]:
        """The images found unreadable so far (in this process or any DataLoader worker), skipped."""
        return [self.paths[i] for i in torch.nonzero(self._unreadable).flatten().tolist()]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for {len(self.paths)} images in {self.root}")
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            if self._unreadable[candidate]:
                continue
            path = self.paths[candidate]
            try:
                image = load_rgb(path)
            except UNREADABLE_IMAGE_ERRORS as e:
                self._unreadable[candidate] = True
                warnings.warn(f"skipping unreadable image {path}: {e.__class__.__name__}: {e}", stacklevel=2)
                continue
            return {
                "image": self.transform(image),
                "caption": self.captions[candidate],
                "class_label": self.labels[candidate],
                "human_label": self.classes[self.labels[candidate]] if self.classes else "",
                "file_path_": str(path),
                "index": candidate,
            }
        raise NoReadableImages(f"none of the {len(self.paths)} images under {self.root} could be read (see the warnings "
                               "above); replace the damaged files or point 'root' at another folder")
