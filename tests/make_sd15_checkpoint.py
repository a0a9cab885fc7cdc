"""Write a randomly initialised, architecture-true SD1.5 checkpoint (UNet + VAE + CLIP-L, original key names).

The module trees are built by ComfyUI's own classes on the meta device (no init cost), then every tensor is
filled with random values of the right shape: weights N(0, 1/fan_in), norm scales 1, biases 0. ComfyUI detects
the file as SD1.5 exactly as it would a real one. Used by the real-server tests; never committed.

usage: python make_sd15_checkpoint.py COMFY_DIR OUT_FILE [fp16|fp32]   (OUT_FILE is written atomically)
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def main(comfy_dir: str, out_file: str, precision: str = "fp16") -> None:
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    import torch
    from safetensors.torch import save_file

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA probing
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    dtype = torch.float16 if precision == "fp16" else torch.float32
    ops = comfy.ops.disable_weight_init
    clip_cfg = json.loads((Path(comfy_dir) / "comfy" / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        parts = {"model.diffusion_model.": UNetModel(**UNET, device="meta", operations=ops),
                 "first_stage_model.": AutoencoderKL(ddconfig=VAE, embed_dim=4),
                 "cond_stage_model.transformer.": CLIPTextModel(clip_cfg, dtype=torch.float32, device="meta",
                                                                operations=ops)}
    g = torch.Generator().manual_seed(0)

    def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return (torch.zeros if name.endswith("bias") else torch.ones)(shape, dtype=dtype)
        std = 0.02 if "embedding" in name else 1.0 / math.sqrt(math.prod(shape[1:]))
        return (torch.randn(shape, generator=g) * std).to(dtype)

    sd = {prefix + k: random_tensor(k, tuple(v.shape))
          for prefix, module in parts.items() for k, v in module.state_dict().items() if "position_ids" not in k}
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
