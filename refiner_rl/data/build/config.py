"""The options of ``refiner-rl data build`` (parsed with ``trl.TrlParser`` like the trainers' configs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from refiner_rl.data.synthetic import PROMPT, parse_geometry
from refiner_rl.errors import ConfigError

# Which options each stage reads: a stage's cache is reused only while these (and its input) are unchanged.
STAGE_FIELDS = {
    "ingest": (
        "source",
        "image_column",
        "id_column",
        "region_column",
        "reference_column",
        "min_size",
        "buckets",
        "multiple",
        "dedup_distance",
    ),
    "region": (
        "region_detector",
        "regions_per_image",
        "region_fraction",
        "min_detail",
        "reference_geometry",
        "reference_zoom_range",
        "reference_shift_fraction",
        "reference_warp",
        "reference_margin",
        "prompt",
    ),
    "degrade": (
        "degrade",
        "degrade_pick",
        "editor",
        "editor_transformer_path",
        "regenerate_steps",
        "regenerate_prompt",
        "batch_size",
    ),
    "filter": ("min_inside_mse", "max_outside_mse", "max_inside_psnr", "heldout_fraction"),
}


def _range(value, name: str, lo: float, hi: float | None = None) -> tuple[float, float]:
    """A ``[min, max]`` pair (or one number, min = max) within ``[lo, hi]``."""
    pair = [value, value] if isinstance(value, (int, float)) else list(value)
    if len(pair) != 2 or not lo <= float(pair[0]) <= float(pair[1]) or (hi is not None and float(pair[1]) > hi):
        top = f", max <= {hi}" if hi is not None else ""
        raise ConfigError(f"`{name}` must be [min, max] with {lo} <= min <= max{top}, got {value!r}")
    return float(pair[0]), float(pair[1])


@dataclass
class DataBuildConfig:
    """How clean images become (target, reference, draft, mask) triplets.

    Source and output:
        source (image folder, parquet file or saved ``datasets`` folder), image_column, id_column, output_dir,
        seed, num_proc.
    1. Ingest:
        min_size, buckets, multiple, dedup_distance.
    2. Region and reference:
        region_column (a box or mask per image) or automatic regions (region_fraction, min_detail, regions_per_image;
        region_detector for faces or other objects); reference_column, or a crop around the region warped by
        reference_geometry, reference_zoom_range, reference_shift_fraction, reference_warp, reference_margin.
    3. Degrade:
        degrade (operators), degrade_pick; editor, editor_transformer_path, regenerate_steps, regenerate_prompt,
        batch_size for the editor-based operators (``vae``, ``regenerate``).
    4. Filter and split:
        min_inside_mse, max_outside_mse, max_inside_psnr, heldout_fraction.
    """

    source: str | None = field(
        default=None,
        metadata={
            "help": "Clean images: a folder (searched recursively), a parquet file, or a saved `datasets` folder."
        },
    )
    image_column: str = field(default="image", metadata={"help": "Image column of a parquet/`datasets` source."})
    id_column: str | None = field(
        default=None, metadata={"help": "Column naming each source image (default: its file path or row number)."}
    )
    output_dir: str = field(
        default="outputs/triplets",
        metadata={"help": "Where train/, heldout/, *.parquet, report.json and the stage caches (stages/) go."},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of every random choice: the same seed gives the same records."}
    )
    num_proc: int | None = field(
        default=None, metadata={"help": "Processes of each stage's `datasets` map (editor operators run in one)."}
    )
    prompt: str = field(default=PROMPT, metadata={"help": "The instruction written into every record."})
    # 1. ingest
    min_size: int = field(default=256, metadata={"help": "Drop images whose shorter side is below this (pixels)."})
    buckets: list[int] = field(
        default_factory=lambda: [512, 768, 1024],
        metadata={
            "help": "Resolutions: an image is resized to about bucket^2 pixels (aspect kept) for the largest bucket "
            "not above its own sqrt(H*W); smaller images are dropped."
        },
    )
    multiple: int = field(default=16, metadata={"help": "Resized sides are multiples of this (the codec's need)."})
    dedup_distance: int = field(
        default=4,
        metadata={
            "help": "Drop an image whose 64-bit perceptual hash is within this Hamming distance of an earlier "
            "one; -1 keeps duplicates."
        },
    )
    # 2. region and reference
    region_column: str | None = field(
        default=None,
        metadata={"help": "Column with each image's region: a box [x0, y0, x1, y1] in source pixels, or a mask image."},
    )
    region_detector: str | None = field(
        default=None,
        metadata={
            "help": "'pkg.module:function' taking a PIL image and returning boxes [[x0, y0, x1, y1], ...] "
            "(e.g. a face detector); regions are drawn from its boxes instead of detail energy."
        },
    )
    regions_per_image: int = field(default=1, metadata={"help": "Triplets made from each source image."})
    region_fraction: list[float] = field(
        default_factory=lambda: [0.25, 0.5],
        metadata={"help": "[min, max] side of an automatic region, as a fraction of the image's shorter side."},
    )
    min_detail: float = field(
        default=0.02,
        metadata={"help": "Drop a region whose mean high-frequency energy (|image - blurred|, [0, 1]) is below this."},
    )
    reference_column: str | None = field(
        default=None, metadata={"help": "Column with a reference image per source (e.g. another photo of the object)."}
    )
    reference_geometry: str = field(
        default="zoomed",
        metadata={"help": "How the reference crop is taken: shifted, zoomed, view, a comma list or name=weight pairs."},
    )
    reference_zoom_range: list[float] = field(
        default_factory=lambda: [1.25, 2.0], metadata={"help": "[min, max] magnification of a `zoomed` reference."}
    )
    reference_shift_fraction: float = field(
        default=0.15, metadata={"help": "Largest pan of a `shifted` reference, as a fraction of the crop side."}
    )
    reference_warp: float = field(
        default=0.03,
        metadata={"help": "Largest corner move of the perspective warp applied to every reference (fraction of side)."},
    )
    reference_margin: float = field(
        default=0.5, metadata={"help": "The reference crop grows the region by this times its side on each side."}
    )
    # 3. degrade
    degrade: list[str] = field(
        default_factory=lambda: ["downsample:2-4", "jpeg:20-60"],
        metadata={
            "help": "Operators applied in order, each `name`, `name:value` or `name:min-max` (drawn per record): "
            "downsample (factor), blur (radius px), jpeg (quality), noise (std in [0, 1]), vae (editor's codec "
            "round trip, whole image), regenerate (strength: start sigma of the editor re-drawing the region)."
        },
    )
    degrade_pick: int | None = field(
        default=None, metadata={"help": "Apply only this many of the operators per record, drawn at random (in order)."}
    )
    editor: str | None = field(
        default=None,
        metadata={
            "help": "Editor of `vae`/`regenerate`: `tiny`, or a diffusers pipeline id or folder (FluxKontextPipeline)."
        },
    )
    editor_transformer_path: str | None = field(
        default=None, metadata={"help": "A fine-tuned transformer folder to use in the editor (e.g. an SFT output)."}
    )
    regenerate_steps: int = field(default=8, metadata={"help": "ODE steps of the `regenerate` operator."})
    regenerate_prompt: str = field(
        default="Redraw the marked region.", metadata={"help": "Instruction given to the editor by `regenerate`."}
    )
    batch_size: int = field(default=8, metadata={"help": "Records per editor call."})
    # 4. filter and split
    min_inside_mse: float = field(
        default=1e-3, metadata={"help": "Keep a triplet only if MSE(draft, target) inside the mask is at least this."}
    )
    max_outside_mse: float = field(
        default=2e-3, metadata={"help": "Keep a triplet only if MSE(draft, target) outside the mask is at most this."}
    )
    max_inside_psnr: float | None = field(
        default=None, metadata={"help": "Also drop triplets whose PSNR inside the mask is above this (dB)."}
    )
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of source images whose triplets go to heldout/ (never to train/)."}
    )

    def __post_init__(self):
        from refiner_rl.data.build.degrade import parse_operators

        if not self.source:
            raise ConfigError("`source` is required: an image folder, a parquet file or a saved `datasets` folder")

        if not self.buckets or any(int(b) < self.multiple for b in self.buckets):
            raise ConfigError(f"`buckets` must list sides >= multiple ({self.multiple}), got {self.buckets}")
        self.buckets = sorted(int(b) for b in self.buckets)
        if self.min_size < 1 or self.multiple < 1 or self.regions_per_image < 1 or self.batch_size < 1:
            raise ConfigError("`min_size`, `multiple`, `regions_per_image` and `batch_size` must be >= 1")
        if not -1 <= self.dedup_distance <= 32:
            raise ConfigError(f"`dedup_distance` must be in [-1, 32] bits (of 64), got {self.dedup_distance}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"`num_proc` must be >= 1 or unset, got {self.num_proc}")
        self.region_fraction = list(_range(self.region_fraction, "region_fraction", 0.01, 1.0))
        self.reference_zoom_range = list(_range(self.reference_zoom_range, "reference_zoom_range", 1.0))
        try:
            geometry = parse_geometry(self.reference_geometry)
        except ConfigError as e:
            raise ConfigError(f"`reference_geometry`: {e}") from e
        if "aligned" in geometry:
            raise ConfigError("`reference_geometry`: `aligned` is not allowed (a reference is never pixel-aligned)")
        if not (0 <= self.reference_warp < 0.25) or self.reference_shift_fraction <= 0 or self.reference_margin < 0:
            raise ConfigError(
                "`reference_warp` must be in [0, 0.25), `reference_shift_fraction` > 0 and `reference_margin` >= 0"
            )
        if self.region_detector:
            from refiner_rl.data.build.region import load_detector

            load_detector(self.region_detector)
        ops = parse_operators(self.degrade)
        if self.degrade_pick is not None and not 1 <= self.degrade_pick <= len(ops):
            raise ConfigError(f"`degrade_pick` must be in [1, {len(ops)}] (the number of operators) or unset")
        if any(op.needs_editor for op in ops) and not self.editor:
            raise ConfigError("`degrade` uses `vae` or `regenerate`, which need `editor` (e.g. `tiny` or a model)")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"`heldout_fraction` must be in [0, 1), got {self.heldout_fraction}")

    def stage_options(self, stage: str) -> dict:
        """The options ``stage`` reads, plus the seed (its cache key, with the stage's input)."""
        return {"seed": self.seed, **{k: getattr(self, k) for k in STAGE_FIELDS[stage]}}
