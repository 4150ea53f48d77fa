"""Reference registration on held-out synthetic triplets: how often the transform is found, how well the warped
reference lines up with the target inside the mask (relative to the draft's error), and what it costs per record
against one SFT step of the tiny editor, all measured in one run.

    python bench/registration.py --records 48 --size 32

Prints one row per geometry: records whose region centre lands within a pixel at the right scale (3%), the warped
reference's in-mask MSE / the draft's, records above 0.3x, and milliseconds per record (one thread).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from refiner_rl.data import TripletDataset, collate_triplets, synthetic_records
from refiner_rl.data.images import to_tensor
from refiner_rl.data.registration import register_reference, warp_reference


def _row(geometry: str, n: int, size: int, seed: int) -> tuple[int, float, int, float]:
    found, errs, seconds = 0, [], 0.0
    for r in synthetic_records(n, seed=seed, size=size, geometry=geometry):
        target, draft, ref = (to_tensor(r[k]) for k in ("target", "draft", "reference"))
        mask = (to_tensor(r["mask"]) >= 0.5).float()
        t0 = time.perf_counter()
        s, ox, oy, _ = register_reference(draft, ref, mask)
        seconds += time.perf_counter() - t0
        ys, xs = torch.nonzero(mask[0], as_tuple=True)
        c = np.array([(xs.min() + xs.max() + 1).item() / 2, (ys.min() + ys.max() + 1).item() / 2, 1.0])
        t = np.asarray(r["ref_transform"]).reshape(3, 3)
        truth = t @ c
        truth = truth[:2] / truth[2]
        found += bool(
            np.abs(np.array([s * c[0] + ox, s * c[1] + oy]) - truth).max() < 1 and abs(s / t[0, 0] - 1) < 0.03
        )
        warped = warp_reference(ref, (s, ox, oy), (size, size), "bilinear")
        errs.append([float(((a - target) ** 2 * mask).sum()) for a in (warped, draft)])
    e = np.array(errs)
    return found, e[:, 0].sum() / e[:, 1].sum(), int((e[:, 0] > 0.3 * e[:, 1]).sum()), 1000 * seconds / n


def _sft_step_ms(size: int, batch: int = 16) -> float:
    from refiner_rl.policies import KontextPolicy

    policy = KontextPolicy.tiny()
    ds = TripletDataset(synthetic_records(batch, seed=0, size=size), multiple=4)
    b = collate_triplets([ds[i] for i in range(batch)])
    opt = torch.optim.AdamW(policy.transformer.parameters(), lr=1e-4)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        cond = policy.encode_conditions(b["draft"], b["reference"], prompts=b["prompt"])
        x0 = policy.encode_images(b["target"])
        eps, sigma = torch.randn_like(x0), torch.rand(batch)
        x = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * eps
        loss = (policy.velocity(x, sigma, cond) - (eps - x0)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=48)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(1)
    step = _sft_step_ms(a.size)
    print(f"tiny editor SFT step (batch 16, one thread): {step:.0f} ms")
    print("| geometry | found | warped in-mask MSE / draft's | above 0.3x | ms / record | records per SFT step time |")
    print("|---|---|---|---|---|---|")
    for g in ("aligned", "shifted", "zoomed", "view"):
        found, ratio, bad, ms = _row(g, a.records, a.size, a.seed)
        print(f"| {g} | {found}/{a.records} | {ratio:.3f} | {bad} | {ms:.0f} | {step / ms:.1f} |")


if __name__ == "__main__":
    main()
