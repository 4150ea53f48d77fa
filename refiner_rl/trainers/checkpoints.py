"""Finding, checking and atomically writing ``checkpoint-N`` folders.

``--resume_from_checkpoint`` takes ``true`` / ``latest`` (the newest ``checkpoint-N`` of ``output_dir``),
``latest_valid`` (the newest one whose files are all intact) or a path. A checkpoint is intact when its
``trainer_state.json`` parses, its weights are present (LoRA, ``transformer/`` or DeepSpeed's ``global_step*/``)
and every ``.pt``/``.pth``/``.safetensors`` file in it is complete. The checks read headers only (a zip's central
directory, a safetensors header against the file size), so a 100 GB optimizer state costs no more than a small one.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import struct
import zipfile

from refiner_rl.errors import CheckpointError

logger = logging.getLogger(__name__)

PREFIX = "checkpoint"
STAGING_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = ("pytorch_lora_weights.safetensors", "transformer")
LATEST = ("true", "latest")
LATEST_VALID = "latest_valid"
NO_RESUME = ("", "false", "none", "no")


def list_checkpoints(run_dir: str) -> list[str]:
    """``checkpoint-N`` folders of ``run_dir``, newest (largest N) first; staging folders are never listed."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(run_dir) if (m := re.fullmatch(rf"{PREFIX}-(\d+)", n))]
    return [os.path.join(run_dir, n) for _, n in sorted(found, reverse=True) if os.path.isdir(os.path.join(run_dir, n))]


def checkpoint_problem(path: str) -> str | None:
    """None when ``path`` is an intact checkpoint, else ``"<file>: <what is wrong>"``."""
    if not os.path.isdir(path):
        return f"{path}: no such checkpoint folder"
    state = os.path.join(path, TRAINER_STATE)
    try:
        with open(state) as f:
            json.load(f)["global_step"]
    except FileNotFoundError:
        return f"{state}: missing"
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f"{state}: not a trainer state ({type(e).__name__}: {e})"
    if not any(os.path.exists(os.path.join(path, w)) for w in WEIGHTS) and not glob.glob(
        os.path.join(path, "global_step*")
    ):
        return f"{path}: no weights ({' or '.join(WEIGHTS)} or global_step*/)"
    for root, _, files in os.walk(path):
        for name in sorted(files):
            problem = _file_problem(os.path.join(root, name))
            if problem:
                return f"{os.path.join(root, name)}: {problem}"
    return None


def _file_problem(file: str) -> str | None:
    if file.endswith((".pt", ".pth", ".bin")):
        try:
            with zipfile.ZipFile(file) as z:  # torch.save writes a zip: truncation loses its central directory
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"truncated or not a torch file ({e})"
    elif file.endswith(".safetensors"):
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if 8 + n <= size else None
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError):
            header = None
        if header is None:
            return "truncated or not a safetensors file (unreadable header)"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            return f"truncated ({size} bytes, the header announces {8 + n + end})"
    elif file.endswith(".json"):
        try:
            with open(file) as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"not valid JSON ({e})"
    return None


def _intact_hint(candidates: list[str]) -> str:
    for c in candidates:
        if checkpoint_problem(c) is None:
            return f"the newest intact checkpoint is {c} (resume from it with `--resume_from_checkpoint latest_valid`)"
    return "no older intact checkpoint: start a new run (drop --resume_from_checkpoint)"


def resolve_checkpoint(value, run_dir: str) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint value`` names, checked; None = start a new run.

    ``True``/``"true"``/``"latest"``: the newest ``checkpoint-N`` in ``run_dir``; ``"latest_valid"``: the newest
    intact one (older broken ones are skipped with a warning); anything else is a path. A broken checkpoint raises
    :class:`CheckpointError` naming the file and the newest intact checkpoint."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in NO_RESUME):
        return None
    key = "true" if value is True else str(value).strip()
    if key.lower() in (*LATEST, LATEST_VALID):
        found = list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(
                f"--resume_from_checkpoint {key}: no checkpoint-N folder in {run_dir!r}; "
                "drop --resume_from_checkpoint to start a new run"
            )
        if key.lower() == LATEST_VALID:
            for c in found:
                problem = checkpoint_problem(c)
                if problem is None:
                    return c
                logger.warning("skipping broken checkpoint %s", problem)
            raise CheckpointError(
                f"no intact checkpoint in {run_dir!r}; the newest is broken: {checkpoint_problem(found[0])}"
            )
        path, older = found[0], found[1:]
    else:
        path = key
        parent = os.path.dirname(os.path.abspath(path))
        older = [c for c in list_checkpoints(parent) if _step(c) < _step(path)]
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"cannot resume: {problem}; {_intact_hint(older)}")
    return path


def _step(path: str) -> int:
    m = re.fullmatch(rf"{PREFIX}-(\d+)", os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else 1 << 62


def publish_checkpoint(staging: str, final: str) -> None:
    """Move a completely written ``staging`` folder to ``final`` in one rename (replacing an older ``final``)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(staging, final)


def remove_stale_staging(run_dir: str) -> None:
    """Delete staging folders a killed run left behind (they are never resumed from)."""
    for d in glob.glob(os.path.join(run_dir, f"{STAGING_PREFIX}{PREFIX}-*")):
        shutil.rmtree(d, ignore_errors=True)
