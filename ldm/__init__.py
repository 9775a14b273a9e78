"""ldm: latent diffusion, CompVis-compatible, CPU-first and offline."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ldm")
except PackageNotFoundError:  # a checkout used without installing
    __version__ = "unknown"
