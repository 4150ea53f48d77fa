"""Start-up time and peak memory of the data layer for a small and a large set of records on disk.

    python bench/data_loading.py                          # 1K vs 10K records of 64 px, generated once
    python bench/data_loading.py --folder /tmp/bench_data --sizes 1000 10000 --num-proc 2

It writes ``max(--sizes)`` synthetic records (PNG files, ``--image-size`` px) into ``--folder`` once (reused by
later runs) plus one ``records_<n>.jsonl`` per size listing the first ``n`` of them. Then, for each size, it
builds the training set as ``refiner-rl sft`` does (``DataArguments(...).build``) in a fresh Python process,
twice: with an empty ``datasets`` cache (cold: the JSONL is read into Arrow and every record validated) and again
with that cache filled (warm: the cached validation is reused and no image is opened). Each process reports:

- start-up: seconds to build the dataset, imports excluded;
- peak RSS of the process (``resource.getrusage``), and its growth over the RSS after the imports;
- the seconds to read 64 items afterwards (images are decoded only then).

and the run prints the large/small ratios, measured in this one run. Validation runs in the measured process
unless ``--num-proc`` > 1 (its workers' memory is then reported apart, as the children's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def _rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def _generate(folder: str, n: int, size: int) -> None:
    """``n`` synthetic records as PNG files and ``records_all.jsonl``, one record at a time (flat memory)."""
    import numpy as np

    from refiner_rl.data.synthetic import make_triplet

    done = os.path.join(folder, "records_all.jsonl")
    if os.path.isfile(done) and sum(1 for _ in open(done)) >= n:
        return
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with open(done + ".tmp", "w") as f:
        for i in range(n):
            rec = make_triplet(rng, size)
            row = {"id": f"b{i}", "prompt": rec["prompt"]}
            for key in ("target", "draft", "reference", "mask"):
                row[key] = f"b{i}_{key}.png"
                rec[key].save(os.path.join(folder, row[key]), compress_level=1)
            f.write(json.dumps(row) + "\n")
    os.replace(done + ".tmp", done)
    print(f"generated {n} records of {size} px in {time.perf_counter() - t0:.1f}s into {folder}", flush=True)


def _child(records: str, cache_dir: str, num_proc: int | None) -> None:
    """One measurement, printed as a JSON line."""
    import datasets

    from refiner_rl.configs import DataArguments

    datasets.disable_progress_bars()
    base = _rss_mb()
    t0 = time.perf_counter()
    ds = DataArguments(dataset=records, dataset_cache_dir=cache_dir, dataset_num_proc=num_proc).build(multiple=16)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    for i in range(min(64, len(ds))):
        ds[i]
    read = time.perf_counter() - t1
    out = dict(
        records=len(ds),
        cached=ds.report.cached,
        startup_s=startup,
        read64_s=read,
        rss_after_imports_mb=base,
        peak_rss_mb=_rss_mb(),
        peak_rss_children_mb=_rss_mb(resource.RUSAGE_CHILDREN),
    )
    print(json.dumps(out), flush=True)


def _measure(records: str, cache_dir: str, num_proc: int | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", records, "--cache-dir", cache_dir]
    if num_proc:
        cmd += ["--num-proc", str(num_proc)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default=None, help="where the records are generated (default: a temp folder)")
    p.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000], help="small and large record counts")
    p.add_argument("--image-size", type=int, default=64, help="side of the generated images (default 64)")
    p.add_argument("--num-proc", type=int, default=None, help="processes of the validation pass (default: one)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.child, a.cache_dir, a.num_proc)
        return 0

    folder = a.folder or os.path.join(tempfile.gettempdir(), f"refiner_rl_bench_data_{a.image_size}px")
    small, large = sorted(a.sizes)
    _generate(folder, large, a.image_size)
    lines = open(os.path.join(folder, "records_all.jsonl")).readlines()
    results = {}
    for n in (small, large):
        records = os.path.join(folder, f"records_{n}.jsonl")
        with open(records, "w") as f:
            f.writelines(lines[:n])
        cache = tempfile.mkdtemp(prefix=f"refiner_rl_bench_cache_{n}_")
        try:
            results[n] = {"cold": _measure(records, cache, a.num_proc), "warm": _measure(records, cache, a.num_proc)}
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    print(
        f"\n{'records':>8} {'cache':>5} {'start-up s':>10} {'read 64 s':>9} {'peak RSS MB':>11} {'over imports MB':>15}"
    )
    for n, runs in results.items():
        for kind, r in runs.items():
            assert r["records"] == n and r["cached"] == (kind == "warm"), r
            grow = r["peak_rss_mb"] - r["rss_after_imports_mb"]
            print(
                f"{n:>8} {kind:>5} {r['startup_s']:>10.2f} {r['read64_s']:>9.3f} {r['peak_rss_mb']:>11.1f} {grow:>15.1f}"
            )
    print(f"\nratios {large} / {small} records (one run):")
    for kind in ("cold", "warm"):
        s, b = results[small][kind], results[large][kind]
        rss = b["peak_rss_mb"] / s["peak_rss_mb"]
        print(
            f"  {kind}: peak RSS x{rss:.2f} ({'<' if rss < 1.5 else 'NOT <'} 1.5), "
            f"start-up x{b['startup_s'] / s['startup_s']:.1f}"
        )
    for n in (small, large):
        c, w = results[n]["cold"], results[n]["warm"]
        print(f"  {n} records: warm start-up {w['startup_s']:.2f}s vs cold {c['startup_s']:.2f}s")
    if a.num_proc:
        print("  validation workers' peak RSS:", {n: results[n]["cold"]["peak_rss_children_mb"] for n in results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
