"""Every Python block of the README and docs/ pages, run as written: the blocks of one page in order, in one
namespace (a page's later blocks use its earlier ones' names), from a scratch working directory.

What a reader fills in (their run's checkpoint, their images) is replaced by the toolkit's own files and small
tensors (`PLACEHOLDERS`, `INPUTS`); blocks that need what a test cannot have (a download) are listed in
`NOT_RUN` with the reason. Run by tests/test_docs_code.py from the checkout, and by scripts/check_wheel.sh with the
installed wheel outside it:

    python tests/docs_blocks.py REPO_ROOT        # prints one line per page; exit status 1 when a block fails
"""
from __future__ import annotations

import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

PAGES = ["README.md", "docs/*.md"]
# Text a reader replaces -> what the run uses (the built-in models' files, found by ldm.assets from anywhere).
PLACEHOLDERS = {
    '"logs/<run>/checkpoints/last.safetensors"': 'str(resolve("models/first_stage_models/kl-f4-shapes/model.safetensors"))',
    '"kl_f4.safetensors"': 'str(resolve("models/first_stage_models/kl-f4-shapes/model.safetensors"))',
    # A training run's checkpoint: the shipped model trained with that config (its export shares the first stage,
    # which load_model, not build_model, reads from its own file).
    'build_model("configs/latent-diffusion/txt2img.yaml", "logs/<run>/checkpoints/last.ckpt")': 'load_model("txt2img")',
    "[[(class_label, (x0, y0, x1, y1)), ...]]": "[[(0, (0.1, 0.1, 0.6, 0.6)), (3, (0.5, 0.5, 0.9, 0.9))]]",
}
# The reader's own inputs the blocks name: small tensors of the shapes the comments give.
INPUTS = """
import torch
from ldm.assets import resolve
from ldm.inference import load_model
images = torch.rand(2, 3, 32, 32) * 2 - 1
low_res = torch.rand(1, 3, 8, 8) * 2 - 1
label_maps = torch.zeros(1, 32, 32, dtype=torch.long)
"""
# (page, block index) -> why it is not run here.
NOT_RUN = {
    ("docs/compatibility.md", 0): "needs the released 1.45B text-to-image checkpoint (a download)",
    ("docs/compatibility.md", 1): "needs diffusers and an exported pipeline; tests/test_diffusers_pipeline.py runs "
                                  "the same calls",
}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def pages(root: Path) -> list[Path]:
    return [path for pattern in PAGES for path in sorted(root.glob(pattern))]


def run_page(root: Path, page: Path) -> tuple[int, list[str]]:
    """(blocks run, failures) of one page, in a scratch working directory holding the inpainting examples."""
    import os

    from ldm.cli.make_inpainting_examples import write_examples

    name = page.relative_to(root).as_posix()
    namespace: dict = {}
    failures, ran = [], 0
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            write_examples(Path("data/inpainting_examples"), 6, 32)  # as `ldm-make-inpainting-examples` writes them
            exec(INPUTS, namespace)
            for index, block in enumerate(python_blocks(page)):
                if (name, index) in NOT_RUN:
                    continue
                for placeholder, value in PLACEHOLDERS.items():
                    block = block.replace(placeholder, value)
                started = time.perf_counter()
                try:
                    exec(compile(block, f"{name} block {index}", "exec"), namespace)
                    ran += 1
                    print(f"[docs] {name} block {index}: {time.perf_counter() - started:.1f} s", flush=True)
                except Exception:  # noqa: BLE001 (every failure is reported, with its traceback)
                    failures.append(f"{name} block {index}:\n{traceback.format_exc(limit=-3)}")
        finally:
            os.chdir(previous)
    return ran, failures


def main(root: Path) -> int:
    failures = []
    for page in pages(root):
        if not python_blocks(page):
            continue
        ran, failed = run_page(root, page)
        print(f"[docs] {page.relative_to(root)}: {ran} block(s) ran, {len(failed)} failed")
        failures += failed
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
