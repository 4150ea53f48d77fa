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
    report = build_dataset(config)
    print(json.dumps({"outputs": report["outputs"], "report": f"{config.output_dir}/report.md"}))
    return 0
