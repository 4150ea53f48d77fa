"""FLUX.1-Kontext: the refiner's editor. Its conditions ride on the sequence axis.

Token layout (OmniRefiner §3): the image stream is ``[noisy target | draft | reference]`` on the sequence
axis. Each block keeps its own row/col grid (the reference's can be all zero or moved beside the draft's:
:func:`reference_ids`); the first RoPE id channel tells them apart: target 0, draft 1, reference ``reference_id``
(default 2). The velocity is read from the target tokens only.

Loading, text encoding, the velocity forward and LoRA are shared by every FLUX.1 editor
(:mod:`refiner_rl.policies.flux`); this module adds the draft + reference conditions.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from refiner_rl.policies.flux import Conditions, FluxPolicy, TextEmbeds, image_ids

__all__ = ["REFERENCE_POSITIONS", "KontextPolicy", "ReferencePositions", "reference_ids"]

ReferencePositions = Literal["grid", "none", "beside"]
REFERENCE_POSITIONS = get_args(ReferencePositions)


def reference_ids(grid_h: int, grid_w: int, index: int, positions: str = "grid", draft_w: int = 0, device=None):
    """RoPE ids of the reference tokens: ``grid`` their own row/col grid (over the draft's when the sizes match),
    ``none`` row = col = 0 (attention to the reference depends on content only, not on where a token sits), or
    ``beside`` the grid moved right by the draft's width ``draft_w`` (no reference token shares a draft position)."""
    ids = image_ids(grid_h, grid_w, index, device)
    if positions == "none":
        ids[:, 1:] = 0
    elif positions == "beside":
        ids[:, 2] += draft_w
    elif positions != "grid":
        raise ValueError(f"reference_positions must be one of {', '.join(REFERENCE_POSITIONS)}, got {positions!r}")
    return ids


class KontextPolicy(FluxPolicy):
    """A FLUX.1-Kontext editor: refines the ``draft`` with a ``reference`` and an instruction."""

    kind = "kontext"
    pipeline_class_name = "FluxKontextPipeline"
    condition_fields = ("draft", "reference")
    default_guidance_scale = 2.5

    def __init__(self, *args, reference_id: int = 2, reference_positions: str = "grid", **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_id = int(reference_id)
        if self.reference_id in (0, 1):
            raise ValueError("reference_id must differ from the target's id (0) and the draft's id (1)")
        self.reference_positions = reference_positions  # see reference_ids

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("reference_id", "reference_positions")

    @torch.no_grad()
    def encode_conditions(
        self,
        draft: torch.Tensor,
        reference: torch.Tensor,
        prompts: list[str] | None = None,
        text: TextEmbeds | None = None,
        negative_prompts: list[str] | None = None,
    ) -> Conditions:
        """Encode draft and reference (each on its own grid) and the instruction, once per record."""
        if text is None:
            if prompts is None:
                raise ValueError("encode_conditions needs `prompts` or precomputed `text` embeddings")
            text = self.encode_prompts(prompts)
        d = self.encode_images(draft)
        r = self.encode_images(reference)
        dh, dw = self.latent_grid(*draft.shape[-2:])
        rh, rw = self.latent_grid(*reference.shape[-2:])
        dev = self.device
        ref = reference_ids(rh // 2, rw // 2, self.reference_id, self.reference_positions, dw // 2, dev)
        neg = self.encode_prompts(negative_prompts) if negative_prompts is not None else None
        return Conditions(
            target_ids=image_ids(dh // 2, dw // 2, 0, dev),
            text=text,
            grid=(dh, dw),
            tokens=torch.cat([d, r], dim=1),
            ids=torch.cat([image_ids(dh // 2, dw // 2, 1, dev), ref]),
            negative=neg,
        )
