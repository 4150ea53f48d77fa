"""Reference registration: find where the masked region of the draft appears in the reference, and warp the
reference into the draft's frame so that the region's detail lines up with the mask.

A reference that shows the true detail somewhere else and at another scale (a panned view, a zoomed crop around
the region) is brought to the draft's geometry before the editor sees it. The transform is a scale and a
translation, ``ref = s * target + o`` in continuous pixel coordinates (pixel ``k`` spans ``[k, k + 1)``), found by
template matching (docs/algorithms.md, "Registration"):

1. the template is the draft over the mask's bounding box grown by ``context`` times its longer side; pixels in
   the mask weigh 1, the ring around it ``context_weight`` (the region is degraded, its surroundings are not);
2. coarse: for each of ``num_scales`` scales ``s`` spaced geometrically over ``scale_range``, the reference is
   resampled with step ``s`` (antialiased) and both are low-passed with a Gaussian of ``blur`` pixels; the
   weighted mean squared difference to every window, counting only the pixels in view, is three convolutions; the
   ``per_scale`` best local minima of each scale are seeds;
3. refine: candidates around the seeds are sampled bilinearly from the full reference; inside the mask they are
   degraded the way drafts are (an area down-sample by ``degrade`` and a bilinear round trip) before they are
   compared. Every seed is screened on its 3 x 3 neighbourhood, the ``candidates`` best are searched (scale
   +-6%, offsets +-2 s) and the winner once more, finer (scale +-2%, offsets +-s/2 in s/8 steps);
4. a reference of the draft's size stays in place when the winner's surroundings disagree with the draft's or are
   out of view and the identity fits inside the mask clearly better (an aligned reference on another background).

:func:`warp_reference` then samples the reference at ``s * (x + 0.5) + o`` for every draft pixel ``x`` (nearest,
bilinear, or bilinear after an area prefilter); draft pixels whose place falls outside the reference are 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from refiner_rl.errors import ConfigError

WARP_MODES = ("nearest", "bilinear", "area")
CACHE_VERSION = 1  # bump when register_reference's result changes for the same images and settings
RING_MISMATCH = 0.01  # mean squared difference around the mask above which the surroundings are taken to disagree


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with reflected borders (identity for sigma < 0.3)."""
    if sigma < 0.3:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad_h, pad_w = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
    x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode="reflect" if min(pad_h, pad_w) > 0 else "replicate")
    kh = k[r - pad_h : r + pad_h + 1].view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = k[r - pad_w : r + pad_w + 1].view(1, 1, 1, -1).expand(c, 1, 1, -1)
    return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)


def _sample(img: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``img`` ``[C, H, W]`` sampled at continuous pixel coordinates ``xs`` ``[..., W']``, ``ys`` ``[..., H', 1]``
    (broadcast to a ``[..., H', W']`` grid); returns ``[..., C, H', W']``, 0 outside the image."""
    H, W = img.shape[-2:]
    gx, gy = torch.broadcast_tensors(xs * (2.0 / W) - 1.0, ys * (2.0 / H) - 1.0)
    lead = gx.shape[:-2]
    grid = torch.stack([gx, gy], dim=-1).reshape(-1, *gx.shape[-2:], 2)
    out = F.grid_sample(
        img.unsqueeze(0).expand(grid.shape[0], -1, -1, -1), grid, mode=mode, padding_mode="zeros", align_corners=False
    )
    return out.reshape(*lead, *out.shape[1:])


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    on = mask[0] >= 0.5
    if not bool(on.any()):
        return 0, 0, mask.shape[-1], mask.shape[-2]
    ys, xs = torch.nonzero(on, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _window_costs(template, weight, inside, image, valid):
    """Weighted mean squared difference of ``template`` ``[C, h, w]`` (weights ``[1, h, w]``) to every window of
    ``image`` ``[C, H, W]``, counting only pixels where ``valid`` ``[1, H, W]`` is 1: ``(cost, covered)``, each
    ``[H - h + 1, W - w + 1]``, ``covered`` the fraction of ``inside`` (the mask's part) the window covers."""
    c = template.shape[0]
    # sum_w v (T - I)^2 = conv(v, w T^2) - 2 conv(I, w T) + conv(I^2, w); with sum_w v and sum_inside v
    stack = torch.cat([valid, image, image.pow(2)])[None]  # [1, 1 + 2C, H, W]
    z = torch.zeros_like(template)
    kernels = torch.stack(
        [
            torch.cat(
                [(weight * template.pow(2)).sum(0, keepdim=True), -2 * weight * template, weight.expand(c, -1, -1)]
            ),
            torch.cat([c * weight, z, z]),
            torch.cat([inside, z, z]),
        ]
    )  # [3, 1 + 2C, h, w]
    num, den, cov = F.conv2d(stack, kernels)[0]
    return num / den.clamp_min(1e-8), cov / inside.sum().clamp_min(1e-8)


@contextmanager
def _one_thread():
    """Run on one intra-op thread: a float sum's order, and so a near-tie between two matches, then does not depend
    on the process's thread count (a run on one process and on two must register alike)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _scales(lo: float, hi: float, n: int) -> list[float]:
    return [lo] if n == 1 or hi == lo else [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def _coarse_seeds(tmpl, weight, inside, ref, scales, blur, per_scale):
    """``[(cost, s, ox, oy)]``: the best ``per_scale`` local minima of the low-passed window cost at every scale.
    ``tmpl`` is the low-passed template ``[C, h, w]`` whose pixel ``j`` is draft pixel ``x0 + j`` (the caller
    adds ``s * x0``)."""
    # the coarse pass runs with the template about 16 pixels across (kc draft pixels per template pixel)
    kc = max(1, round(max(tmpl.shape[-2:]) / 16))
    if kc > 1:
        tmpl, weight, inside = (F.avg_pool2d(x[None], kc, ceil_mode=True)[0] for x in (tmpl, weight, inside))
    hs, ws = tmpl.shape[-2:]
    Hr, Wr = ref.shape[-2:]
    found = []
    for s in scales:
        nx, ny = max(1, round(Wr / (s * kc))), max(1, round(Hr / (s * kc)))
        sx, sy = Wr / nx, Hr / ny  # the lattice's exact steps
        lattice = F.interpolate(ref[None], size=(ny, nx), mode="bilinear", antialias=True, align_corners=False)
        lattice = _gaussian(lattice, blur)[0]
        # windows may leave the reference by up to the template's size (those pixels do not count)
        lattice = F.pad(lattice, (ws, ws, hs, hs))
        valid = F.pad(torch.ones(1, ny, nx), (ws, ws, hs, hs))
        cost, covered = _window_costs(tmpl, weight, inside, lattice, valid)
        cost = torch.where(covered >= 0.75, cost, torch.full_like(cost, math.inf))
        local_min = cost <= -F.max_pool2d(-cost[None, None], 3, stride=1, padding=1)[0, 0]
        cost = torch.where(local_min, cost, torch.full_like(cost, math.inf))
        vals, idx = cost.flatten().topk(min(per_scale, cost.numel()), largest=False)
        for v, i in zip(vals.tolist(), idx.tolist()):
            if math.isfinite(v):
                ky, kx = divmod(i, cost.shape[1])
                # template pixel j (draft pixels x0 + kc j ..) meets lattice pixel kx - ws + j, centred at
                # sx (kx - ws + j + 0.5) = s (x0 + kc (j + 0.5)) + o with s = sx / kc
                found.append((v, (sx + sy) / (2 * kc), sx * (kx - ws), sy * (ky - hs)))
    return found


def register_reference(
    draft: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale_range: tuple[float, float] = (0.5, 3.0),
    num_scales: int = 16,
    context: float = 0.5,
    context_weight: float = 1.0,
    blur: float = 1.5,
    degrade: int = 4,
    work_size: int = 64,
    candidates: int = 6,
    per_scale: int = 2,
) -> tuple[float, float, float, float]:
    """``(s, ox, oy, cost)``: the scale and translation taking the draft's frame to the reference's (module
    docstring) for one item (``draft`` ``[3, H, W]``, ``reference`` ``[3, Hr, Wr]``, ``mask`` ``[1, H, W]``), and
    the match's weighted mean squared difference (lower is better).

    The template is the mask's bounding box grown by ``context`` times its longer side (clipped to the image);
    pixels outside the mask weigh ``context_weight``. Images whose box is larger than ``work_size`` pixels are
    registered at a reduced resolution (draft and reference shrunk by the same whole factor). Runs on one thread."""
    with _one_thread(), torch.no_grad():
        return _register(
            draft, reference, mask, scale_range=scale_range, num_scales=num_scales, context=context,
            context_weight=context_weight, blur=blur, degrade=degrade, work_size=work_size, candidates=candidates,
            per_scale=per_scale,
        )  # fmt: skip


def _register(draft, reference, mask, *, scale_range, num_scales, context, context_weight, blur, degrade, work_size,
              candidates, per_scale):  # fmt: skip
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not (0 < lo <= hi) or num_scales < 1 or context < 0 or context_weight < 0 or work_size < 8:
        raise ConfigError(
            "reference registration: needs 0 < scale_range[0] <= scale_range[1], num_scales >= 1, context >= 0, "
            f"context_weight >= 0 and work_size >= 8, got {scale_range}, {num_scales}, {context}, "
            f"{context_weight}, {work_size}"
        )
    H, W = draft.shape[-2:]
    mx0, my0, mx1, my1 = _bbox(mask)
    pad = int(math.ceil(context * max(mx1 - mx0, my1 - my0)))
    k = max(1, math.ceil(max(min(W, mx1 + pad) - max(0, mx0 - pad), min(H, my1 + pad) - max(0, my0 - pad)) / work_size))
    if k > 1:  # register at 1/k of the resolution: x_ref = s x + o becomes x_ref / k = s (x / k) + o / k
        shrink = lambda x: F.avg_pool2d(x.float()[None], k, ceil_mode=True)[0]  # noqa: E731
        s, ox, oy, cost = _register(
            shrink(draft), shrink(reference), (shrink(mask) >= 0.5).float(), scale_range=scale_range,
            num_scales=num_scales, context=context, context_weight=context_weight, blur=blur,
            degrade=max(1, round(degrade / k)), work_size=work_size, candidates=candidates, per_scale=per_scale,
        )  # fmt: skip
        return s, k * ox, k * oy, cost
    x0, y0, x1, y1 = max(0, mx0 - pad), max(0, my0 - pad), min(W, mx1 + pad), min(H, my1 + pad)
    inside = mask[:, y0:y1, x0:x1].float().clamp(0, 1)
    if float(inside.sum()) <= 0:
        inside = torch.ones_like(inside)
    weight = inside + context_weight * (1 - inside)
    d, ref = draft.float(), reference.float()
    Hr, Wr = ref.shape[-2:]
    tmpl = _gaussian(d[None], blur)[0, :, y0:y1, x0:x1]
    found = _coarse_seeds(tmpl, weight, inside, ref, _scales(lo, hi, num_scales), blur, per_scale)
    if not found:
        return 1.0, 0.0, 0.0, math.inf
    found = [(v, s, ox - s * x0, oy - s * y0) for v, s, ox, oy in found]

    # Refinement on the unblurred images: inside the mask the draft is compared with the reference warped and
    # then degraded the way drafts are (an area down-sample by ``degrade`` and a bilinear round trip over the
    # mask's box), outside it with the warped reference as it is.
    target = d[:, y0:y1, x0:x1]
    jx = torch.arange(x0, x1, dtype=ref.dtype) + 0.5
    jy = torch.arange(y0, y1, dtype=ref.dtype) + 0.5
    bx, by = slice(mx0 - x0, mx1 - x0), slice(my0 - y0, my1 - y0)
    cx, cy = (mx0 + mx1) / 2, (my0 + my1) / 2
    ones = torch.ones(1, Hr, Wr)
    inner = inside[:, by, bx]

    def costs(seeds, rel_s: float, n_s: int, step: float, n_o: int):
        """Candidates around each seed (scale by rel_s steps about the region's centre, offsets by step * s) and
        their costs: ``(params [S, K, 3], cost [S, K], cost inside the mask [S, K])``."""
        grid = [
            (i * rel_s, dx * step, dy * step)
            for i in range(-n_s, n_s + 1)
            for dx in range(-n_o, n_o + 1)
            for dy in range(-n_o, n_o + 1)
        ]
        g = torch.tensor(grid, dtype=ref.dtype)  # [K, 3]
        seed = torch.tensor(seeds, dtype=ref.dtype)[:, None, :]  # [S, 1, 3]
        s2 = seed[..., 0] * (1 + g[:, 0])
        ox = seed[..., 1] + (seed[..., 0] - s2) * cx + g[:, 1] * seed[..., 0]
        oy = seed[..., 2] + (seed[..., 0] - s2) * cy + g[:, 2] * seed[..., 0]
        params = torch.stack([s2, ox, oy], -1)  # [S, K, 3]
        p = params.reshape(-1, 3)
        xs = p[:, 0].view(-1, 1, 1) * jx.view(1, 1, -1) + p[:, 1].view(-1, 1, 1)
        ys = p[:, 0].view(-1, 1, 1) * jy.view(1, -1, 1) + p[:, 2].view(-1, 1, 1)
        samples = _sample(ref, xs, ys)  # [N, C, h, w]
        valid = _sample(ones, xs, ys, "nearest")  # [N, 1, h, w]
        box = samples[..., by, bx]
        samples[..., by, bx] = inner * _degrade(box, degrade) + (1 - inner) * box
        sq = (samples - target).pow(2).sum(1, keepdim=True)

        def mean(w):
            return ((sq * w).flatten(1).sum(1) / (3 * w.flatten(1).sum(1)).clamp_min(1e-8)).view(params.shape[:2])

        ring = (1 - inside) * valid  # the surroundings' cost, or inf where less than a tenth of them is in view
        seen = ring.flatten(1).sum(1) >= 0.1 * (1 - inside).sum().clamp_min(1)
        ring_cost = torch.where(seen.view(params.shape[:2]), mean(ring), torch.full(params.shape[:2], math.inf))
        return params, mean(weight * valid), mean(inside * valid), ring_cost

    def best(params, cost, *parts):
        i = int(cost.flatten().argmin())
        return (tuple(float(v) for v in params.reshape(-1, 3)[i]), *(float(c.flatten()[i]) for c in (cost, *parts)))

    # screen every seed on its 3 x 3 neighbourhood, then search around the best few, then finer
    _, screen, _, _ = costs([f[1:] for f in found], 0.0, 0, 0.5, 1)
    order = screen.min(1).values.argsort()[:candidates].tolist()
    params, *_ = best(*costs([found[i][1:] for i in order], 0.03, 2, 0.5, 4))
    params, cost, in_cost, ring_cost = best(*costs([params], 0.01, 2, 0.125, 4))
    if (Hr, Wr) == (H, W) and params != (1.0, 0.0, 0.0) and ring_cost > RING_MISMATCH:
        # The best match's surroundings do not agree with the draft's or are out of view (the reference shows
        # the detail on another background, or fills it), so only the mask's part counts: a reference the size
        # of the draft that matches there clearly better (half the error, less 1e-4) stays where it is.
        _, id_cost, id_in, _ = best(*costs([(1.0, 0.0, 0.0)], 0.0, 0, 0.0, 0))
        if id_in + 1e-4 < 0.5 * in_cost:
            return 1.0, 0.0, 0.0, id_cost
    return (*params, cost)


def _degrade(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Area down-sample by ``factor`` and bilinear back up (identity for factor <= 1)."""
    if factor <= 1:
        return x
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, h // factor), max(1, w // factor)), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def warp_reference(
    reference: torch.Tensor, transform: tuple[float, float, float], size: tuple[int, int], mode: str = "area"
) -> torch.Tensor:
    """The reference ``[3, Hr, Wr]`` in the draft's frame ``size`` (H, W): pixel ``(x, y)`` takes the reference at
    ``s * (x + 0.5) + o``. ``mode``: ``nearest``, ``bilinear``, or ``area`` (bilinear after a Gaussian prefilter
    of ``0.5 * s`` reference pixels when ``s > 1``, so a magnified reference is averaged, not aliased)."""
    if mode not in WARP_MODES:
        raise ConfigError(f"reference registration: warp mode {mode!r} is not one of {', '.join(WARP_MODES)}")
    s, ox, oy = (float(v) for v in transform)
    H, W = size
    src = reference.float()
    if mode == "area" and s > 1:
        src = _gaussian(src.unsqueeze(0), 0.5 * s)[0]
    xs = s * (torch.arange(W, dtype=src.dtype) + 0.5) + ox
    ys = s * (torch.arange(H, dtype=src.dtype) + 0.5) + oy
    return _sample(src, xs.view(1, -1), ys.view(-1, 1), "nearest" if mode == "nearest" else "bilinear")


def default_cache_dir() -> str:
    """``$REFINER_RL_CACHE``, else ``~/.cache/refiner_rl``."""
    return os.environ.get("REFINER_RL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "refiner_rl")


class RegistrationCache:
    """Registrations found before, so that a resumed run, a second stage or an evaluation of the same records does
    not search again (about 0.3 s of one core per 32 px record, hours for a large set).

    An entry's key is a hash of the decoded images (draft, mask, every reference, as the dataset hands them to
    :func:`register_reference`), the registration settings and :data:`CACHE_VERSION`; its value is the list of
    ``(s, ox, oy, cost)``, one per reference. Entries are appended to ``folder/registrations.jsonl``, one line per
    entry written in a single ``write`` of an append-only file, so processes can share the folder; a torn line (a
    killed run) is ended before the next entry and skipped when read."""

    FILE = "registrations.jsonl"

    def __init__(self, folder: str):
        self.folder = os.path.abspath(os.path.expanduser(folder))
        self.path = os.path.join(self.folder, self.FILE)

    @staticmethod
    def key(item: dict, keys: list[str], settings: dict) -> str:
        h = hashlib.sha256(json.dumps([CACHE_VERSION, sorted(settings.items()), keys], default=list).encode())
        for name in ("draft", "mask", *keys):
            t = item[name].detach().to("cpu", torch.float32).contiguous()
            h.update(repr((name, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def load(self) -> dict[str, list[tuple[float, float, float, float]]]:
        out: dict[str, list[tuple[float, float, float, float]]] = {}
        if not os.path.isfile(self.path):
            return out
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    out[row["key"]] = [tuple(float(v) for v in t) for t in row["transforms"]]
                except (ValueError, KeyError, TypeError):
                    continue  # a torn or foreign line
        return out

    def add(self, entries: dict[str, list[tuple[float, float, float, float]]]) -> None:
        if not entries:
            return
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":
                os.write(fd, b"\n")  # end a torn last line, so the next entry starts on its own
            for key, transforms in entries.items():
                row = {"key": key, "transforms": [[float(v) for v in t] for t in transforms]}
                os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)
