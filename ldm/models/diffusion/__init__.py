"""Diffusion models (`ddpm.py`: the reference's DDPM and LatentDiffusion) and their samplers (`samplers.py`, with
the reference's `DDIMSampler` and `PLMSSampler` as facades over it in `ddim.py` and `plms.py`)."""
