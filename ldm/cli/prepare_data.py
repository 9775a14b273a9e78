"""Write training data as WebDataset tar shards with an index, for the streaming datasets (ldm/data/shards.py).

    python scripts/prepare_data.py --input data/images/train --output shards/train
    python scripts/prepare_data.py --input data/images/train --output shards/train --class-from-subfolders
    python scripts/prepare_data.py --builtin txt2img --split train -n 20000 --output shards/builtin-train

A folder is read in any layout the folder datasets read (captions in name.txt, metadata.jsonl or metadata.csv;
classes from sub-folders with --class-from-subfolders); each image is stored as it is (resized and cropped when
training streams it, exactly as from the folder) with its caption, class label and file name. An image that cannot
be read is left out and listed in the index. The built-in data is written as PNGs at --size.

Shards hold --shard-size items each and are named <prefix>-000000.tar, <prefix>-000001.tar, ... (prefix: the
input folder's name, or the split); index.json beside them lists each shard's count and first and last key, the
source and the options. Interrupted, the same command again keeps the finished shards and writes the rest. Train on
them with a config such as configs/latent-diffusion/txt2img_shards.yaml, whose urls are e.g.
shards/train/train-{000000..000019}.tar (this program prints the pattern).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from ldm.data.folder import CAPTION_SOURCES
from ldm.data.shapes import DEFAULT_NUM_SAMPLES, SPLITS
from ldm.data.shard_writer import BUILTIN_TASKS, BuiltinSource, FolderSource, Source, prepare_shards
from ldm.script_args import HelpFormatter, check_writable, command_line, positive_int


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="a folder of images (with captions or class sub-folders)")
    source.add_argument("--builtin", choices=BUILTIN_TASKS,
                        help="the built-in shapes (the same items, with caption and class label, for every task)")
    parser.add_argument("--output", type=Path, required=True, help="the folder the shards and index.json go to")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="items per shard")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the input folder's name, or the "
                                                       "split)")
    parser.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1) - 1),
                        help="processes writing shards in parallel (default: one per core but one)")
    folder = parser.add_argument_group("folder (--input)")
    folder.add_argument("--caption-source", choices=CAPTION_SOURCES, default="auto",
                        help="where captions are: auto (jsonl, then csv, then txt, else none), txt, jsonl, csv, none")
    folder.add_argument("--class-from-subfolders", action="store_true",
                        help="class labels from the sub-folder names (sorted), as class_from_subfolders: true")
    folder.add_argument("--caption-column", default="text", help="the caption column of metadata.jsonl / .csv")
    builtin = parser.add_argument_group("built-in data (--builtin)")
    builtin.add_argument("--split", choices=SPLITS, default="train", help="which split")
    builtin.add_argument("-n", "--n", type=positive_int, default=None,
                         help=f"items 0..n-1 of the split (default: the split's size, {DEFAULT_NUM_SAMPLES})")
    builtin.add_argument("--size", type=positive_int, default=32, help="image side in pixels")
    builtin.add_argument("--seed", type=int, default=0, help="the built-in data's seed (as its datasets' seed)")
    return parser


def make_source(opt: argparse.Namespace) -> Source:
    if opt.input is not None:
        if not opt.input.is_dir():
            raise FileNotFoundError(f"--input {opt.input}: no such folder; give the folder of your images")
        output, images = opt.output.resolve(), opt.input.resolve()
        if output == images or images in output.parents:
            # The shards would sit among the images, and a folder dataset reading them later would walk into them.
            raise ValueError(f"--output {opt.output} is inside --input {opt.input}; write the shards to a folder "
                             "outside the images (e.g. shards/train)")
        return FolderSource(str(opt.input), opt.caption_source, opt.class_from_subfolders, opt.caption_column)
    return BuiltinSource(opt.builtin, opt.split, opt.n or DEFAULT_NUM_SAMPLES[opt.split], opt.size, opt.seed)


def url_pattern(output: Path, index: dict[str, Any]) -> str:
    """The brace pattern of every shard in `index` (what a config's ``urls`` takes)."""
    names = [shard["name"] for shard in index["shards"]]
    if len(names) == 1:
        return str(output / names[0])
    prefix = names[0].rsplit("-", 1)[0]
    return str(output / f"{prefix}-{{{names[0].rsplit('-', 1)[1][:-4]}..{names[-1].rsplit('-', 1)[1][:-4]}}}.tar")


def main(argv: Optional[list[str]] = None) -> None:
    opt = get_parser().parse_args(argv)
    source = make_source(opt)
    check_writable(opt.output, "--output")
    prefix = opt.prefix or (opt.input.resolve().name if opt.input is not None else opt.split)
    with tqdm(total=len(source), desc=f"writing {prefix} shards", unit="item") as bar:
        index = prepare_shards(source, opt.output, opt.shard_size, prefix, opt.workers, progress=bar.update)
    skipped = index["skipped"]
    if skipped:
        print(f"left out {len(skipped)} unreadable image(s) (listed in {opt.output / 'index.json'}), e.g. "
              f"{skipped[0]['key']}: {skipped[0]['error']}")
    print(f"wrote {index['total']} items in {len(index['shards'])} shards to {opt.output}; urls: "
          f"{url_pattern(opt.output, index)}")


cli = command_line(main)
