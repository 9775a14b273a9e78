"""`python scripts/grow_vocabulary.py ...` from a checkout (installed or not). The code is
`ldm/cli/grow_vocabulary.py`; `--help` describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.grow_vocabulary import cli  # noqa: E402

if __name__ == "__main__":
    cli()
