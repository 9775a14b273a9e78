"""Diffusion models (`ddpm.py`: the reference's DDPM and LatentDiffusion) and their samplers (`samplers.py`, `ddim.py`,
`plms.py`, `ancestral.py`)."""
