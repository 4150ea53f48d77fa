"""Shipped recipes (YAML), installed as ``refiner_rl.recipes`` so ``refiner-rl demo`` finds them anywhere."""
