"""``refiner-rl refine``: apply a trained refiner to new drafts, exactly as it was trained.

One image set::

    refiner-rl refine --model outputs/demo/grpo --draft draft.png --reference ref.png --mask mask.png \\
        --prompt "Fix the pattern according to the reference image" --output_dir refined

or records (a JSONL file, a parquet file, a folder holding one, or a ``datasets`` name; the training columns, no
target needed)::

    refiner-rl refine --model outputs/demo/grpo --records held_out/records.jsonl --output_dir refined
    accelerate launch --num_processes 2 -m refiner_rl refine --model ... --records ... --output_dir ...

The base model, LoRA or full weights, reference registration and positions, guidance and the sampler (steps, start
sigma, true CFG, paste-back, region focus) are read from the model folder's ``refiner_rl_model.json``; a flag forces
another value (logged with the one the model was trained with). Writes, as each record is done (each file written
whole, so a later failure loses nothing): ``refined/NAME.png`` and ``grids/NAME.png`` (draft | reference as served |
refined); at the end ``refined.jsonl`` (one row per record; the in-mask error when the record has a target) and
``refined.json`` (settings, counts). Record ``i``'s noise is keyed by ``(seed, i)``, as ``refiner-rl eval``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile

from refiner_rl.errors import ConfigError, DataError

logger = logging.getLogger("refiner_rl")


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refiner-rl refine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="A refiner-rl output or checkpoint folder (LoRA or full weights)")
    p.add_argument("--output_dir", required=True)
    g = p.add_argument_group("one image set")
    g.add_argument("--draft", help="The image to refine")
    g.add_argument("--reference", action="append", help="The reference image (the editors here take one)")
    g.add_argument("--mask", help="Region to refine (white); default: the whole image")
    g.add_argument("--prompt", help="The instruction")
    g = p.add_argument_group("records")
    g.add_argument("--records", help="JSONL / parquet / folder / datasets name of {prompt, draft, reference, mask?}")
    g.add_argument("--skip_invalid_records", nargs="?", const=True, default=False, type=_bool)
    g.add_argument("--alpha_background", default="white", help="How transparent pixels are flattened")
    g.add_argument("--resolution", type=int, default=None, help="Resize to about resolution^2 pixels (default: keep)")
    g.add_argument("--batch_size", type=int, default=1, help="Records sampled together (of one size)")
    g = p.add_argument_group("sampling (default: as the model was trained)")
    g.add_argument("--num_inference_steps", type=int, default=None)
    g.add_argument("--start_sigma", type=float, default=None, help="1 = from noise; below 1 the draft noised to it")
    g.add_argument("--paste_back", type=_bool, default=None, help="Keep the draft outside the mask")
    g.add_argument("--true_cfg_scale", type=float, default=None)
    g.add_argument("--negative_prompt", default="")
    g.add_argument("--focus_crop", type=_bool, default=None, help="Refine a crop around the mask, pasted back")
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Record i's noise is keyed by (seed, i), as eval's (default: the seed the model's figures were measured "
        "with, when it saved one, else 0)",
    )
    g = p.add_argument_group("serving (default: as the model was trained)")
    g.add_argument("--reference_alignment", default=None, choices=["none", "register"])
    g.add_argument("--reference_positions", default=None, choices=["grid", "none", "beside"])
    g.add_argument("--guidance_scale", type=float, default=None)
    g.add_argument("--base_model", default=None, help="What the weights sit on (default: saved with the model)")
    g.add_argument("--transformer_path", default=None, help="The full fine-tune under a LoRA (default: saved)")
    g.add_argument("--tiny_model", default=None, help="JSON shape of a tiny base editor (default: saved)")
    g.add_argument("--revision", default=None)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--torch_dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--disable_tqdm", nargs="?", const=True, default=False, type=_bool)
    return p


def _inputs(args) -> tuple[object, str | None]:
    """The records to refine and the folder their paths are relative to; one image set becomes one record."""
    if args.records and args.draft:
        raise ConfigError("refine: give --records FILE or one image set (--draft, --reference, ...), not both")
    if args.records:
        extra = [f for f in ("reference", "mask", "prompt") if getattr(args, f)]
        if extra:
            raise ConfigError(f"refine: --{extra[0]} belongs to one image set (--draft); records carry their own")
        return args.records, None
    if not args.draft or not args.reference or args.prompt is None:
        raise ConfigError("refine: give --draft, --reference and --prompt (one image set), or --records FILE")
    if len(args.reference) > 1:
        raise ConfigError(f"refine: {len(args.reference)} references given; this project's editors take one")
    for flag, path in (("draft", args.draft), ("reference", args.reference[0]), ("mask", args.mask)):
        if path is not None and not os.path.isfile(path):
            raise DataError(f"refine: --{flag} {path!r}: file not found")
    record = {"id": os.path.splitext(os.path.basename(args.draft))[0], "prompt": args.prompt}
    record.update(draft=os.path.abspath(args.draft), reference=os.path.abspath(args.reference[0]))
    if args.mask:
        record["mask"] = os.path.abspath(args.mask)
    else:
        print("[refine] no --mask: the whole image is the region to refine")
    return [record], None


def output_name(record: dict, index: int, single: bool) -> str:
    """A file name for a record: its ``id`` (one image set: the draft's name), after the index for records."""
    rid = re.sub(r"[^A-Za-z0-9._-]+", "_", str(record.get("id") or "")).strip("._")
    if single:
        return rid or "refined"
    return f"{index:05d}" + (f"-{rid}" if rid else "")


def save_png(path: str, image) -> None:
    """``image`` ([3, H, W] in [0, 1]) written whole: a temporary file in the same folder, renamed over ``path``."""
    from torchvision.transforms.functional import to_pil_image

    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=folder)
    os.close(fd)
    try:
        to_pil_image(image.float().clamp(0, 1).mul(255).round().byte()).save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_grid_file(path: str, row) -> None:
    from refiner_rl.reporting import save_grid

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=os.path.dirname(path))
    os.close(fd)
    try:
        save_grid(tmp, [row], scale=max(1, 256 // max(im.shape[-2] for im in row)))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value, lines: bool = False) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        if lines:
            f.writelines(json.dumps(row) + "\n" for row in value)
        else:
            json.dump(value, f, indent=2)
            f.write("\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    import torch
    from tqdm.auto import tqdm

    from refiner_rl.evaluation.run import _process_state
    from refiner_rl.metrics.masked_mse import MaskedMSE
    from refiner_rl.refine import load_refiner, refine_batches, refine_dataset

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ConfigError("refine: --batch_size must be >= 1")
    tiny_model = None
    if args.tiny_model:
        try:
            tiny_model = json.loads(args.tiny_model)
        except json.JSONDecodeError as e:
            raise ConfigError(f"refine: --tiny_model must be a JSON object: {e}") from e
    records, base_dir = _inputs(args)
    if args.disable_tqdm:
        import datasets

        datasets.disable_progress_bars()  # reading a records file
    single = args.records is None
    if not os.path.isdir(args.model):
        raise ConfigError(f"refine: --model {args.model!r} is not a folder (a refiner-rl output or checkpoint)")
    state = _process_state()
    rank, world = state.process_index, state.num_processes
    refiner = load_refiner(
        args.model,
        device=args.device or state.device,
        torch_dtype=args.torch_dtype,
        base_model=args.base_model,
        transformer_path=args.transformer_path,
        tiny_model=tiny_model,
        revision=args.revision,
        reference_alignment=args.reference_alignment,
        reference_positions=args.reference_positions,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        start_sigma=args.start_sigma,
        true_cfg_scale=args.true_cfg_scale,
        paste_back=args.paste_back,
        focus_crop=args.focus_crop,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
    )
    dataset = refine_dataset(refiner, records, base_dir=base_dir, resolution=args.resolution)
    dataset.alpha_background = args.alpha_background
    out = args.output_dir
    for folder in ("refined", "grids"):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    indices = list(range(rank, len(dataset), world))
    partial = os.path.join(out, f"refined.partial-{rank}.jsonl")  # rows of the records written so far
    rows: list[dict] = []
    skipped: list[str] = []
    regions = {"mse_in": MaskedMSE("inside"), "mse_out": MaskedMSE("outside")}
    quiet = args.disable_tqdm or single or not state.is_main_process
    bar = tqdm(total=len(indices), desc="refine", unit="rec", disable=quiet)
    with open(partial, "w") as log, bar:  # the bar ends before an error's line
        batches = refine_batches(
            refiner,
            dataset,
            indices,
            batch_size=args.batch_size,
            skip_invalid=args.skip_invalid_records,
            skipped=skipped,
        )
        for batch, images in batches:
            errors = {k: m(images, batch).values.reshape(-1) for k, m in regions.items()} if "target" in batch else {}
            for r, index in enumerate(batch["index"].tolist()):
                record = dataset.record(index)
                name = output_name(record, index, single)
                row = {"index": index, "id": record.get("id"), "prompt": batch["prompt"][r]}
                row.update(refined=f"refined/{name}.png", grid=f"grids/{name}.png")
                row["mask"] = record.get("mask") not in (None, "")
                row.update({k: float(v[r]) if v[r] == v[r] else None for k, v in errors.items()})
                save_png(os.path.join(out, row["refined"]), images[r])
                save_grid_file(os.path.join(out, row["grid"]), [batch["draft"][r], batch["reference"][r], images[r]])
                log.write(json.dumps(row) + "\n")
                log.flush()
                rows.append(row)
            bar.update(len(rows) + len(skipped) - bar.n)
        bar.update(len(rows) + len(skipped) - bar.n)
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (rows, skipped))
        rows = [row for part, _ in gathered for row in part]
        skipped = [msg for _, part in gathered for msg in part]
    os.remove(partial)
    if not state.is_main_process:
        return 0
    rows.sort(key=lambda row: row["index"])
    write_json(os.path.join(out, "refined.jsonl"), rows, lines=True)
    summary = {
        "model": os.path.abspath(args.model),
        "served": refiner.served,
        "records": len(rows),
        "skipped": len(skipped),
        "skipped_records": skipped,
        "whole_image": sum(not row["mask"] for row in rows),
        "processes": world,
    }
    scored = [row for row in rows if row.get("mse_in") is not None]
    if scored:
        summary["mse_in"] = sum(row["mse_in"] for row in scored) / len(scored)
        summary["mse_out"] = sum(row["mse_out"] or 0.0 for row in scored) / len(scored)
        summary["scored"] = len(scored)
    write_json(os.path.join(out, "refined.json"), summary)
    line = f"[refine] {len(rows)} record(s) refined"
    if skipped:
        line += f", {len(skipped)} invalid record(s) skipped"
    if summary["whole_image"] and not single:
        line += f"; {summary['whole_image']} without a mask: the whole image was the region"
    if scored:
        line += f"; in-mask MSE against the target {summary['mse_in']:.4f} ({len(scored)} record(s))"
    print(f"{line}: {os.path.abspath(out)}")
    return 0
