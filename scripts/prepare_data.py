"""`python scripts/prepare_data.py ...`, from a checkout (installed or not). The code is
`ldm/cli/prepare_data.py`, also installed as the `ldm-prepare-data` command; `--help`
describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.prepare_data import cli  # noqa: E402

if __name__ == "__main__":
    cli()
