"""Throughput of the patch-DreamSim reward: batched over the whole batch vs one image at a time.

    python bench/rewards_throughput.py                      # tiny random model, offline
    python bench/rewards_throughput.py --model-size base --image-size 512 --batch 16 --device cuda
    python bench/rewards_throughput.py --cache-dir ./models --no-random-weights   # real DreamSim weights

It scores the same images three ways, in one run, with the same ``PatchDreamSim`` object:

1. batched: one call for the whole batch (all patches of all images in forwards of ``--forward-batch`` pairs);
2. per image: a Python loop calling the reward with one image at a time (the same code path);
3. per patch (``--per-patch``): one forward per patch pair, the naive implementation.

and prints images/s for each and the speed-up of (1) over (2) and (3). The scores of the three ways are
compared as a check. ``--random-weights`` (the default) writes a DreamSim cache with random weights of the
chosen width (``tiny``: 32, ``small``: ViT-S 384, ``base``: ViT-B 768, the real model's shape), so the
benchmark runs offline; timings depend on the shapes only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from refiner_rl.rewards.patch_dreamsim import DREAMSIM_SIZE, PatchDreamSim
from refiner_rl.scoring.patches import crop_resize

# The random-weight DreamSim cache writer is test tooling (tests/dreamsim_cache.py), not part of the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.dreamsim_cache import make_random_dreamsim_cache  # noqa: E402

MODEL_SIZES = {"tiny": (32, 2), "small": (384, 6), "base": (768, 12)}  # (embed dim, heads); depth 12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, object]]:
    """Median seconds and last output per mode; modes alternate within each repeat so that drifting load
    on a shared machine hits them alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            outs[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=256, help="square image side in pixels (default 256)")
    p.add_argument("--batch", type=int, default=8, help="images per reward call in the batched mode (default 8)")
    p.add_argument("--patch-size", type=int, default=64, help="patch side in pixels (default 64)")
    p.add_argument("--selection", default="grid", choices=["grid", "bbox", "both"])
    p.add_argument(
        "--model-size",
        default="tiny",
        choices=sorted(MODEL_SIZES),
        help="width of the random ViT (default tiny)",
    )
    p.add_argument(
        "--random-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build a random-weight DreamSim cache (default); --no-random-weights uses --cache-dir",
    )
    p.add_argument("--cache-dir", default=None, help="DreamSim cache with real weights (with --no-random-weights)")
    p.add_argument("--forward-batch", type=int, default=64, help="patch pairs per forward (the reward's batch_size)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per mode; the median is reported")
    p.add_argument("--per-patch", action="store_true", help="also time one forward per patch pair")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights:
            dim, heads = MODEL_SIZES[args.model_size]
            cache_dir = make_random_dreamsim_cache(os.path.join(tmp, "dreamsim"), embed_dim=dim, num_heads=heads)
        elif args.cache_dir:
            cache_dir = args.cache_dir
        else:
            p.error("--no-random-weights needs --cache-dir")
        reward = PatchDreamSim(
            cache_dir=cache_dir,
            patch_size=args.patch_size,
            selection=args.selection,
            batch_size=args.forward_batch,
            device=device,
        )

        g = torch.Generator().manual_seed(0)
        n, s = args.batch, args.image_size
        targets = [torch.rand(3, s, s, generator=g) for _ in range(n)]
        samples = [(t + 0.1 * torch.randn(3, s, s, generator=g)).clamp(0, 1) for t in targets]
        masks = [torch.zeros(1, s, s) for _ in range(n)]
        for m in masks:
            m[:, s // 4 : s // 2, s // 4 : 3 * s // 4] = 1
        prompts = [""] * n
        n_patches = len(reward.select_patches(s, s, masks[0])[0])

        def batched():
            return reward(prompts, samples, target=targets, mask=masks)

        def per_image():
            return [reward([""], [samples[i]], target=[targets[i]], mask=[masks[i]])[0] for i in range(n)]

        def per_patch():
            out = []
            for i in range(n):
                patches, weights = reward.select_patches(s, s, masks[i])
                vals = []
                for patch in patches:
                    a = crop_resize(samples[i].to(device), [patch.content], DREAMSIM_SIZE)
                    b = crop_resize(targets[i].to(device), [patch.content], DREAMSIM_SIZE)
                    vals.append(1.0 - reward.patch_distances(a, b)[0])
                out.append(float((torch.stack(vals) * weights).sum() / weights.sum()))
            return out

        batched()  # warm-up (allocator, kernels)
        modes = {"batched": batched, "per image": per_image}
        if args.per_patch:
            modes["per patch"] = per_patch
        res = _timed_interleaved(modes, args.repeats, device)
        t_batched, s_batched = res["batched"]
        print(
            f"device={device} threads={torch.get_num_threads()} model={args.model_size} "
            f"({'random' if args.random_weights else 'real'} weights) image={s}px batch={n} "
            f"patch={args.patch_size} selection={args.selection} patches/image={n_patches} "
            f"forward_batch={args.forward_batch} repeats={args.repeats}"
        )
        print(f"batched:   {n / t_batched:8.2f} images/s  ({t_batched * 1000:.0f} ms per batch of {n})")
        diff = 0.0
        for name in list(modes)[1:]:
            t, scores = res[name]
            print(f"{name + ':':<10} {n / t:8.2f} images/s  -> batched speed-up x{t / t_batched:.2f}")
            diff = max(diff, max(abs(a - b) for a, b in zip(s_batched, scores)))
        print(f"max |score difference| between modes: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
