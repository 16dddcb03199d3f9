"""jdiff: Hydra-configured few-shot style transfer with Stable Diffusion (DreamBooth + LoRA)."""

__version__ = "0.1.0"
