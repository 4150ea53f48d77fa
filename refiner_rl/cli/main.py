"""``refiner-rl`` command line: one entry point, one module per sub-command.

Sub-command modules are imported lazily so ``refiner-rl --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sft": ("refiner_rl.cli.train", "sft_main", "supervised fine-tuning of the editor on triplets"),
    "grpo": ("refiner_rl.cli.train", "grpo_main", "GRPO on sampled groups of edits scored by reward plug-ins"),
    "demo": (
        "refiner_rl.cli.demo",
        "main",
        "the embedded default: synthetic triplets, tiny editor, SFT then GRPO on the CPU",
    ),
    "rewards": (
        "refiner_rl.cli.rewards",
        "main",
        "list reward plug-ins, or score a folder of images with a recipe's rewards",
    ),
}


def _usage() -> str:
    lines = ["usage: refiner-rl <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `refiner-rl <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"refiner-rl: unknown command {name!r}; known commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
