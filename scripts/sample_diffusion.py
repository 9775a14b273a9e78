"""The reference's `python scripts/sample_diffusion.py ...`, from a checkout (installed or not). The code is
`ldm/cli/sample_diffusion.py`, also installed as the `ldm-sample` command; `--help` describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.sample_diffusion import cli  # noqa: E402

if __name__ == "__main__":
    cli()
