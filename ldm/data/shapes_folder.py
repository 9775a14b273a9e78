"""The built-in shapes written out as a captioned folder: the kind of folder a user brings to fine-tuning.

``write_shapes_folder(root, 64, extra_shapes=["heart"], extra_colours=["white"])`` writes ``00000.png`` +
``00000.txt``, ... (the layout ``ldm.data.folder.ImageFolderDataset`` reads with ``caption_source: txt``, as
configs/latent-diffusion/txt2img_folder.yaml and the fine-tuning configs use it) from `ShapesDataset`: with new shapes
or colours every image holds one of them, captioned with the known words around it ("a small white circle on the
left", "a large red heart above a small blue square"). bench/fine_tuning.py teaches the shipped text model new words
from such a folder.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import torch

from ldm.data.shapes import ShapesDataset
from ldm.image_io import save_images

INFO_FILE = "folder.json"  # what the folder was made from: a later call with the same settings reuses it


def write_shapes_folder(root: Union[str, Path], n: int, split: str = "train", seed: int = 0, size: int = 32,
                        extra_shapes: Sequence[str] = (), extra_colours: Sequence[str] = (),
                        caption_style: str = "canonical") -> list[str]:
    """Write items 0..n-1 of the `split` shapes (`seed`, `size`, new `extra_shapes` / `extra_colours`) into `root`
    as numbered PNGs with a ``.txt`` caption each: the canonical caption, or with ``caption_style="typed"`` the
    item's fixed typed phrasing. A folder already made with the same settings is kept as it is; one made otherwise
    is refused rather than mixed. Returns the captions in file order."""
    if caption_style not in ("canonical", "typed"):
        raise ValueError(f"caption_style must be 'canonical' or 'typed', got {caption_style!r}")
    root = Path(root)
    settings = {"n": n, "split": split, "seed": seed, "size": size, "extra_shapes": list(extra_shapes),
                "extra_colours": list(extra_colours), "caption_style": caption_style}
    info = root / INFO_FILE
    if info.is_file():
        made = json.loads(info.read_text())
        if made["settings"] != settings:
            raise FileExistsError(f"{root} holds a shapes folder made with {made['settings']}, not {settings}: "
                                  "give another folder")
        return made["captions"]
    if root.is_dir() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no {INFO_FILE}: give a new folder")
    dataset = ShapesDataset(split, size=size, num_samples=n, seed=seed, extra_shapes=extra_shapes,
                            extra_colours=extra_colours)
    items = [dataset[i] for i in range(n)]
    key = "caption" if caption_style == "canonical" else "typed_caption"
    captions = [item[key] for item in items]
    root.mkdir(parents=True, exist_ok=True)
    images = torch.stack([torch.as_tensor(item["image"]) for item in items]).permute(0, 3, 1, 2)
    for path, caption in zip(save_images(images, root, start=0), captions):
        path.with_suffix(".txt").write_text(caption + "\n")
    # Written last: a folder interrupted half-way has no info file and is refused, not taken as complete.
    info.write_text(json.dumps({"settings": settings, "captions": captions}, indent=1) + "\n")
    return captions
