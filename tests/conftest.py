"""Test-wide settings: everything offline, deterministic, and small."""

import os

# Set before any Hugging Face / wandb import so no test can reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# The cores each test process may use: all of them (at most 2) in one process; an even share of them per worker under
# pytest-xdist (`-n auto`), also for the processes a test launches (CLI runs, `accelerate launch`), so workers
# never oversubscribe the machine (two OpenMP threads spinning against another process are several times slower).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

# tiny checkpoints trained once per session, shared by the eval and refine tests
from tests.trained_checkpoints import held_out, trained  # noqa: E402, F401

torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny forwards: on a shared 2-core machine two OpenMP threads spin
    against other processes (measured 3-10x slower rollouts and ViT patch forwards than one thread under load).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """A test that runs W&B inside the pytest process starts a W&B service and exports ``WANDB_SERVICE``; every later
    subprocess (the CLI tests) would then share that service, which still holds the ids of runs other subprocesses
    opened, so a resumed run's id is refused ("run ID ... is in use"). Tear the service down after such a test."""
    yield
    if "WANDB_SERVICE" in os.environ:
        import wandb

        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
