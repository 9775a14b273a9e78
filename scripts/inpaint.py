"""The reference's `python scripts/inpaint.py ...`, from a checkout (installed or not). The code is
`ldm/cli/inpaint.py`, also installed as the `ldm-inpaint` command; `--help` describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.inpaint import cli  # noqa: E402

if __name__ == "__main__":
    cli()
