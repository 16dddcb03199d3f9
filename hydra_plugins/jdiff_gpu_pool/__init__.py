"""jdiff's sweep launcher, ``hydra/launcher=gpu_pool`` (Hydra finds launchers only in the hydra_plugins package)."""
