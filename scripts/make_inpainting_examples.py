"""`python scripts/make_inpainting_examples.py ...`, from a checkout (installed or not). The code is
`ldm/cli/make_inpainting_examples.py`, also installed as the `ldm-make-inpainting-examples` command; `--help`
describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.make_inpainting_examples import cli  # noqa: E402

if __name__ == "__main__":
    cli()
