"""A DreamSim cache folder with random weights, for the patch_dreamsim tests and ``bench/rewards_throughput.py``.

Written in the layout dreamsim 0.2.1 expects, so ``load_dreamsim(cache_dir)`` runs the real loading code offline.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

from refiner_rl.rewards.patch_dreamsim import keep_torch_hub_dir


def make_random_dreamsim_cache(
    cache_dir: str | os.PathLike,
    *,
    embed_dim: int = 32,
    num_heads: int = 2,
    depth: int = 12,
    mlp_ratio: float = 2.0,
    lora_rank: int = 4,
    seed: int = 0,
) -> str:
    """Write a ``dino_vitb16`` DreamSim cache folder with random weights and no download.

    Same layout and file formats as the real one (torch-hub code ``facebookresearch_dino_main/hubconf.py``,
    backbone ``checkpoints/dino_vitbase16_pretrain.pth``, head ``dino_vitb16_pretrain.pth``, LoRA adapter
    ``dino_vitb16_single_lora/``), so ``load_dreamsim(cache_dir)`` exercises the real loading path. The
    backbone is dreamsim's own ``VisionTransformer`` with a small width; ``depth`` must be at least 12 because
    DreamSim reads block 11. The scores mean nothing.
    """
    if depth < 12:
        raise ValueError("DreamSim reads the output of ViT block 11: depth must be >= 12")
    from dreamsim.feature_extraction.vision_transformer import VisionTransformer
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    cache_dir = os.path.abspath(os.fspath(cache_dir))
    hub_repo = os.path.join(cache_dir, "facebookresearch_dino_main")
    os.makedirs(hub_repo, exist_ok=True)
    os.makedirs(os.path.join(cache_dir, "checkpoints"), exist_ok=True)
    kwargs = {
        "patch_size": 16,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": True,
        "num_classes": 0,
    }
    with open(os.path.join(hub_repo, "hubconf.py"), "w") as f:
        f.write(
            "# Random-weight stand-in for facebookresearch/dino written by refiner_rl (tests/benchmarks only).\n"
            "import os\nimport torch\n"
            "from dreamsim.feature_extraction.vision_transformer import VisionTransformer\n\n"
            "dependencies = ['torch']\n\n\n"
            "def dino_vitb16(pretrained=True, **kwargs):\n"
            f"    model = VisionTransformer(**{kwargs!r}, **kwargs)\n"
            "    if pretrained:\n"
            "        path = os.path.join(torch.hub.get_dir(), 'checkpoints', 'dino_vitbase16_pretrain.pth')\n"
            "        model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))\n"
            "    return model\n"
        )
    # Seeded, and without moving the caller's RNG: the same seed writes the same weights.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm` is deprecated")
        torch.manual_seed(seed)
        backbone = VisionTransformer(**kwargs)
        torch.save(backbone.state_dict(), os.path.join(cache_dir, "checkpoints", "dino_vitbase16_pretrain.pth"))
        # dreamsim loads the DINO projection head but does not use it for `cls` features: tiny tensors.
        names = ("mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight")
        head = {f"module.head.{k}": torch.randn(2, 2) for k in names}
        head.update({f"module.head.{k}": torch.randn(2) for k in ("mlp.0.bias", "mlp.2.bias", "mlp.4.bias")})
        torch.save({"student": head}, os.path.join(cache_dir, "dino_vitb16_pretrain.pth"))

        with keep_torch_hub_dir(), contextlib.redirect_stdout(sys.stderr):
            base = PerceptualModel(
                model_type="dino_vitb16",
                feat_type="cls",
                stride="16",
                lora=True,
                load_dir=cache_dir,
                device="cpu",
                normalize_embeds=True,
            )
        config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, bias="none", target_modules=["qkv"])
        lora = get_peft_model(base, config)
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # a fresh LoRA is the identity (B = 0); make the adapter matter
                p.data = torch.randn(p.shape) * 0.02
        lora.save_pretrained(os.path.join(cache_dir, "dino_vitb16_single_lora"))
    return cache_dir
