"""``refiner-rl data build``: build triplets from clean images (:mod:`refiner_rl.data.build`), options from a
recipe (TrlParser YAML + ``--key value`` overrides)."""

from __future__ import annotations

import json

from refiner_rl.errors import ConfigError

SUBCOMMANDS = {"build": "clean images -> triplets in four cached stages (ingest, region, degrade, filter)"}
PROG = "refiner-rl data build"


def _usage() -> str:
    lines = ["usage: refiner-rl data <command> [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, help_ in SUBCOMMANDS.items()]
    lines += ["", "Run `refiner-rl data build --help` for its options."]
    return "\n".join(lines)


class BuildEditor:
    """The editor behind the ``vae`` and ``regenerate`` degrade operators: ``config.editor`` (a tiny name, folder or
    hub id, with ``editor_transformer_path``) built once per stage run; a random tiny editor is seeded with the
    build's seed, so a rebuild draws the same model."""

    def __init__(self, config):
        import torch

        from refiner_rl.configs import ModelArguments, build_policy

        torch.manual_seed(config.seed)
        args = ModelArguments(
            model_name_or_path=config.editor, use_lora=False, transformer_path=config.editor_transformer_path
        )
        self.policy = build_policy(args, "cuda" if torch.cuda.is_available() else "cpu")
        self.config = config

    def _tensors(self, images):
        import torch

        from refiner_rl.data.images import to_tensor

        return torch.stack([to_tensor(i) for i in images]).to(self.policy.device)

    def vae(self, drafts):
        """``decode(encode(x))`` of whole images (PIL in, PIL out)."""
        from refiner_rl.data.build.common import from_array

        x = self._tensors(drafts)
        out = self.policy.decode(self.policy.encode_images(x), self.policy.latent_grid(*x.shape[-2:]))
        return [from_array(a) for a in out.permute(0, 2, 3, 1).cpu().numpy()]

    def regenerate(self, drafts, references, masks, steps: list[dict]):
        """Each draft noised to its step's ``strength`` (sigma) and sampled back from the step's ``seed`` with
        ``regenerate_steps`` ODE steps, the draft pasted outside the mask (PIL in, PIL out, in input order)."""
        import torch

        from refiner_rl.data.build.common import from_array
        from refiner_rl.sampling import sample_images

        batch = {
            "prompt": [self.config.regenerate_prompt] * len(drafts),
            "index": torch.arange(len(drafts)),
            "draft": self._tensors(drafts),
            "reference": self._tensors(references),
            "mask": (self._tensors(masks) >= 0.5).float(),
        }
        out = []
        for s in sorted({st["strength"] for st in steps}):  # one sampler call per strength
            rows = [i for i, st in enumerate(steps) if st["strength"] == s]
            sub = {k: (v[rows] if isinstance(v, torch.Tensor) else [v[i] for i in rows]) for k, v in batch.items()}
            gens = [torch.Generator().manual_seed(steps[i]["seed"]) for i in rows]
            images = sample_images(
                self.policy, sub, num_steps=self.config.regenerate_steps, generators=gens, start_sigma=s, paste=True
            )
            out += list(zip(rows, images.permute(0, 2, 3, 1).cpu().numpy()))
        return [from_array(a) for _, a in sorted(out, key=lambda p: p[0])]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in SUBCOMMANDS:
        raise ConfigError(f"unknown data command {argv[0]!r}; known: {', '.join(SUBCOMMANDS)}")
    from refiner_rl.cli.train import _recipe_parser, _setup_logging, parse_recipe
    from refiner_rl.data.build import DataBuildConfig, build_dataset

    rest = argv[1:]
    if "-h" in rest or "--help" in rest:
        _recipe_parser((DataBuildConfig,), PROG).print_help()
        return 0
    _setup_logging()
    (config,) = parse_recipe((DataBuildConfig,), rest, PROG)
    report = build_dataset(config, editor=lambda: BuildEditor(config))
    print(json.dumps({"outputs": report["outputs"], "report": f"{config.output_dir}/report.md"}))
    return 0
