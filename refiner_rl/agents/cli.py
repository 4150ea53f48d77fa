"""``refiner-rl edit``: plan an instruction with the planner VLM and apply it step by step with a frozen editor.

One request::

    refiner-rl edit --planner outputs/planner --editor outputs/grpo --image in.png \\
        --instruction "make her coat scarlet and her hair copper red, and remove the sign" --output_dir edits/1

Without ``--planner`` the editor runs once on the raw instruction. With ``--requests requests.jsonl --judge J``
every request is edited with and without the planner and both are scored 0-10 by a VLM judge
(:mod:`refiner_rl.agents.evaluate`); ``report.json`` and a side-by-side table are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from refiner_rl.errors import ConfigError

logger = logging.getLogger("refiner_rl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refiner-rl edit", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--editor",
        required=True,
        help="`tiny`, a diffusers pipeline folder (FluxKontextPipeline), or a refiner-rl checkpoint folder (transformer/ or LoRA)",
    )
    p.add_argument(
        "--editor_base",
        default=None,
        help="Base model under a full fine-tune or LoRA editor checkpoint (default: the one saved with it, else tiny)",
    )
    p.add_argument(
        "--planner",
        default=None,
        help="Planner VLM folder (a `refiner-rl planner` output or any VLM); omit to edit with the raw instruction",
    )
    p.add_argument("--image", help="Input image")
    p.add_argument("--instruction", help="Editing instruction")
    p.add_argument(
        "--reference",
        default=None,
        help="Reference image the editor is conditioned on (default: the image being edited)",
    )
    p.add_argument(
        "--mask",
        default=None,
        help="Region to edit (white), the size of --image (default: the whole image); a refiner editor pastes the "
        "image back outside it when it was trained so",
    )
    p.add_argument(
        "--requests",
        default=None,
        help="JSONL of {image, instruction, reference?, id?}: evaluate planner vs no planner",
    )
    p.add_argument(
        "--judge", default=None, help="VLM judge for --requests: a local VLM folder or an http(s) chat-completions URL"
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--num_steps",
        type=int,
        default=None,
        help="Editor sampling steps per sub-edit (default: as the editor was trained, else 10)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="Resize the input to about resolution^2 pixels")
    p.add_argument("--max_new_tokens", type=int, default=256, help="Planner answer length")
    p.add_argument(
        "--no_sequencer", action="store_true", help="Skip the sequencing agent (decomposition order, templated steps)"
    )
    p.add_argument(
        "--reference_alignment",
        default=None,
        choices=["none", "register"],
        help="Register the reference to the image before the editor sees it (default: as the editor was trained, "
        "from its refiner_rl_model.json, else none)",
    )
    p.add_argument(
        "--reference_positions",
        default=None,
        choices=["grid", "none", "beside"],
        help="RoPE positions of the reference tokens (default: as the editor was trained, else grid)",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--torch_dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    return p


def edit_main(argv: list[str]) -> int:
    import torch
    from PIL import Image

    from refiner_rl.agents.editor import load_editor
    from refiner_rl.agents.generation import load_planner_vlm
    from refiner_rl.agents.pipeline import Planner, run_edit

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    if args.requests is None and (not args.image or not args.instruction):
        raise ConfigError(
            "edit: give --image and --instruction (one request) or --requests FILE --judge J (evaluation)"
        )
    if args.requests is not None and (not args.planner or not args.judge):
        raise ConfigError("edit --requests compares planner and no planner: give --planner and --judge too")
    for flag in ("image", "reference", "mask"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            raise ConfigError(f"edit: --{flag} {getattr(args, flag)!r} does not exist")
    if args.mask and args.requests:
        raise ConfigError("edit: --mask goes with one request (--image); --requests records carry no mask")
    mask = _read_mask(args.mask, args.image) if args.mask else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    editor = load_editor(  # fails before planning
        args.editor,
        base=args.editor_base,
        device=device,
        torch_dtype=args.torch_dtype,
        reference_alignment=args.reference_alignment,
        reference_positions=args.reference_positions,
    )
    planner = None
    if args.planner:
        vlm = load_planner_vlm(args.planner, device=device, dtype="float32" if device == "cpu" else args.torch_dtype)
        planner = Planner(vlm, max_new_tokens=args.max_new_tokens, sequence=not args.no_sequencer)
    edit_kwargs = {"num_steps": args.num_steps, "seed": args.seed, "resolution": args.resolution}
    if args.requests:
        from refiner_rl.agents.evaluate import build_judges, evaluate_requests, format_report, read_requests

        requests = read_requests(args.requests)
        report = evaluate_requests(editor, planner, build_judges(args.judge), requests, args.output_dir, **edit_kwargs)
        print(format_report(report))
        return 0
    reference = Image.open(args.reference).convert("RGB") if args.reference else None
    record = run_edit(
        editor,
        Image.open(args.image),
        args.instruction,
        planner=planner,
        reference=reference,
        mask=mask,
        output_dir=args.output_dir,
        **edit_kwargs,
    )
    print(
        json.dumps(
            {"steps": record["steps"], "warnings": record["warnings"], "output_dir": os.path.abspath(args.output_dir)},
            ensure_ascii=False,
        )
    )
    return 0


def _read_mask(path: str, image_path: str):
    """The ``--mask`` image (8-bit grey); a DataError naming both files when its size is not the image's."""
    from refiner_rl.data.images import header_size, load_image
    from refiner_rl.errors import DataError

    mask = load_image(path, base_dir=None, where=f"edit: --mask {path!r}", mask=True)
    size = header_size(image_path, base_dir=None, where=f"edit: --image {image_path!r}")
    if mask.size != size:
        raise DataError(
            f"edit: --mask {path!r} is {mask.size[0]}x{mask.size[1]} but --image {image_path!r} is {size[0]}x{size[1]}"
        )
    return mask
