"""Conversion to and from diffusers, one file per part: `unet` (UNet2DConditionModel), `autoencoder`
(AutoencoderKL), `text_encoder` (LDMBertModel), `scheduler` (DDIMScheduler) and `pipeline`
(LDMTextToImagePipeline, the whole model both ways). Each maps weights by name only, checks every key, and
raises ValueError naming what diffusers cannot hold. diffusers is imported only when a diffusers object is
built (`common.import_diffusers`)."""
