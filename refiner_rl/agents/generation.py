"""The planning agents' VLM: :class:`refiner_rl.vlm.LocalVLM` (greedy ``generate``), also over a peft adapter.

A folder holding a peft adapter (``adapter_config.json``, as ``refiner-rl planner`` saves with LoRA) is loaded
over the base model the adapter names and merged into it; any other folder or hub id loads as is.
"""

from __future__ import annotations

import json
import os

import torch

from refiner_rl.errors import CheckpointError


def load_planner_vlm(path: str, *, device: str | torch.device = "cpu", dtype: str = "auto"):
    """A frozen :class:`~refiner_rl.vlm.LocalVLM` for the planner at ``path`` (a VLM folder, a hub id, or an adapter)."""
    from refiner_rl.vlm import LocalVLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    adapter = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter):
        return LocalVLM(path, device=device, dtype=torch_dtype)
    with open(adapter) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise CheckpointError(f"planner adapter {path!r} does not name its base model (base_model_name_or_path)")
    from peft import PeftModel

    vlm = LocalVLM(base, device="cpu", dtype=torch_dtype)
    try:
        vlm.model = PeftModel.from_pretrained(vlm.model, path).merge_and_unload()
    except (OSError, ValueError) as err:
        raise CheckpointError(f"planner adapter {path!r} does not load over {base!r}: {err}") from err
    return vlm.to(device)
