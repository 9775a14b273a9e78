"""The reference's `python main.py --base <config> -t`, from a checkout (installed or not). The code is
`ldm/cli/train.py`, also installed as the `ldm-train` command; `--help` describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ldm.cli.train import cli  # noqa: E402

if __name__ == "__main__":
    cli()
