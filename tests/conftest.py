import pytest
import torch

from tests.helpers import make_tiny_dataset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """10 procedural objects, one per label, in both layouts (32 px views)."""
    return make_tiny_dataset(tmp_path_factory.mktemp("shapes") / "data")
