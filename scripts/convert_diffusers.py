"""The reference's `python scripts/convert_diffusers.py ...`, from a checkout (installed or not). The code is
`ldm/cli/convert_diffusers.py`, also installed as the `ldm-convert-diffusers` command; `--help` describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.convert_diffusers import cli  # noqa: E402

if __name__ == "__main__":
    cli()
