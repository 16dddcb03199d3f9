"""Where the torch engine's model loading time goes, on this machine (#6: one style end to end).

    python -m jdiff.bench.model_load data/cache/bench/models/<sd21_random folder> [--dtype bf16]

Times, one model at a time: reading the safetensors into a model (CPU), the move to the GPU, and loading
straight onto the GPU (``device_map``); then the whole ``TorchEngine`` load.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from jdiff.engines.options import TorchOptions
from jdiff.engines.torch.engine import DTYPES, TorchEngine


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jdiff.bench.model_load",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    args = parser.parse_args()
    dtype, clock = DTYPES[args.dtype], time.perf_counter
    started = clock()
    torch.zeros(1, device="cuda")
    print(f"CUDA start: {clock() - started:.2f} s")
    for cls, sub in ((CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae"), (UNet2DConditionModel, "unet")):
        started = clock()
        model = cls.from_pretrained(args.model_dir, subfolder=sub, torch_dtype=dtype, use_safetensors=True)
        read = clock() - started
        started = clock()
        model.to("cuda")
        torch.cuda.synchronize()
        moved = clock() - started
        del model
        started = clock()
        model = cls.from_pretrained(args.model_dir, subfolder=sub, torch_dtype=dtype, use_safetensors=True,
                                    device_map="cuda")
        torch.cuda.synchronize()
        print(f"{sub:>12}: read {read:.2f} s + to GPU {moved:.2f} s; straight to the GPU {clock() - started:.2f} s")
        del model
    torch.cuda.empty_cache()
    started = clock()
    TorchEngine(args.model_dir, TorchOptions(device="cuda", mixed_precision=args.dtype))
    print(f"TorchEngine: {clock() - started:.2f} s")


if __name__ == "__main__":
    main()
