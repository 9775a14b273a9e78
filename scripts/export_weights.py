"""The reference's `python scripts/export_weights.py ...`, from a checkout (installed or not). The code is
`ldm/cli/export_weights.py`, also installed as the `ldm-export` command; `--help` describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.export_weights import cli  # noqa: E402

if __name__ == "__main__":
    cli()
