"""The command-line programs: `ldm-train` (`python main.py`) and the sampling and conversion scripts
(`ldm-txt2img` = `python scripts/txt2img.py`, ...). Each module's `main(argv)` does the work and `cli` is its
console entry point (pyproject.toml's `[project.scripts]`)."""
