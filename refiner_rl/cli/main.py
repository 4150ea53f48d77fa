"""``refiner-rl`` command line: one entry point, one module per sub-command.

Sub-command modules are imported lazily so ``refiner-rl --help`` stays fast. An expected failure (a
:class:`refiner_rl.errors.UserError`: bad data, recipe, reward, checkpoint or server) prints one line on stderr and
exits with code 2; ``--debug`` (or ``REFINER_RL_DEBUG=1``) shows its traceback instead. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "sft": ("refiner_rl.cli.train", "sft_main", "supervised fine-tuning of the editor on triplets"),
    "grpo": ("refiner_rl.cli.train", "grpo_main", "GRPO on sampled groups of edits scored by reward plug-ins"),
    "refl": ("refiner_rl.cli.refl", "main", "reward-gradient training (OneReward ReFL), frozen or EMA reference"),
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
    "eval": ("refiner_rl.cli.eval", "main", "compare the draft, the base editor and checkpoints on held-out metrics"),
    "refine": ("refiner_rl.cli.refine", "main", "apply a trained refiner to new drafts, as it was trained"),
    "planner": ("refiner_rl.agents.train", "planner_main", "train the edit planner VLM with TRL's GRPOTrainer"),
    "edit": ("refiner_rl.agents.cli", "edit_main", "plan an instruction into atomic edits and apply them one by one"),
    "reward-model": ("refiner_rl.onereward.cli", "main", "train the OneReward VLM judge on preference pairs"),
    "data": ("refiner_rl.cli.data", "main", "`data build`: make triplets from clean images (4 cached stages)"),
}


def _usage() -> str:
    lines = ["usage: refiner-rl <command> [options] [--debug]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [
        "",
        "Run `refiner-rl <command> --help` for the options of a command. Errors in the input print one line",
        "(exit code 2); --debug shows their traceback.",
    ]
    return "\n".join(lines)


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove a bare ``--debug`` (TrainingArguments' ``--debug VALUE`` is left alone)."""
    out, debug = [], os.environ.get("REFINER_RL_DEBUG", "") not in ("", "0")
    for i, a in enumerate(argv):
        if a == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            debug = True
        else:
            out.append(a)
    return out, debug


def main(argv: list[str] | None = None) -> int:
    argv, debug = _take_debug(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"refiner-rl: unknown command {name!r}; known commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    from refiner_rl.errors import UserError

    try:
        result = getattr(importlib.import_module(module), func)(rest)
    except UserError as e:
        if debug:
            raise
        print(f"refiner-rl {name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
