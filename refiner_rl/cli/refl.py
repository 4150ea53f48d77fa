"""``refiner-rl refl``: reward-gradient training (ReFL against a frozen or EMA reference, as OneReward trains its
editor). The same recipe handling, launch and save path as ``sft`` and ``grpo`` (:func:`refiner_rl.cli.train.train_main`).
"""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from refiner_rl.cli.train import train_main

    return train_main("refl", argv)
