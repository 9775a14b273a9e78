"""`python scripts/semantic2img.py ...`, from a checkout (installed or not). The code is
`ldm/cli/semantic2img.py`, also installed as the `ldm-semantic2img` command; `--help` describes it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli.semantic2img import cli  # noqa: E402

if __name__ == "__main__":
    cli()
