"""The Jittor engine's fast paths: hand-written kernels, recorded execution plans and the CUDA 13 patch.

Nothing here is needed to read the model: the reference files one folder up (unet.py, vae.py,
text_encoder.py, blocks.py, sampler.py, weights.py, lora.py, engine.py, env.py) read on their own, and
call into this folder only where a faster path takes over the same computation:

    fused_attention.py        flash-style attention (CUDA, and the same algorithm on the CPU), taken by
                              blocks.attention() on CUDA
    tensor_core_attention.py  its float16 kernels on tensor cores (compute capability 8.0 or later)
    kernels.py                transpose and GroupNorm kernels, taken by blocks.py on CUDA
    replay.py                 engine.compile=replay: the training step and sampling UNet calls recorded once as
                              Jittor execution plans and replayed
    cpu_headers/              two stub CUDA headers, so replay.py's recorder builds on a machine without CUDA
    cuda13.py                 `python -m jdiff.engines.jittor.fast.cuda13 apply|status|verify|revert`: patch an
                              installed Jittor 1.3.x to build on CUDA 13 / cuDNN 9

Importing this package does not import Jittor.
"""
