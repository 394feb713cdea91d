import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("ACCELERATE_MIXED_PRECISION", None)  # in-process runs take their precision from their configs

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Tiny random-init SDXL, SD1.5 and SD x4 upscaler pipeline folders, built once per session."""
    from fastdiff.models.tiny import save_tiny

    root = tmp_path_factory.mktemp("teachers")
    return {fam: str(save_tiny(fam, root / fam)) for fam in ("sdxl", "sd15", "sd-x4")}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny convs run far faster on one thread than on two contended ones (a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _back_to_one_thread():
    """Every test starts on one thread, even after a run whose config set ``cpu_threads``."""
    torch.set_num_threads(1)
    yield


@pytest.fixture
def one_thread():
    """Kept for tests that name it; the whole session already runs on one thread."""
    yield


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state: no test depends on the order or luck of others."""
    torch.manual_seed(0)
    yield
