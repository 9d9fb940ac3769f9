import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """A float32 base and two fine-tunes (base + small random task vectors), 2 layers each."""
    return tiny.make_family(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def family4(tmp_path_factory):
    """Same shape, 4 layers, three fine-tunes, base sharded in two files — for slices and gradients."""
    root = tmp_path_factory.mktemp("family4")
    paths = tiny.make_family(root, n_finetunes=3, seed=1, layers=4)
    # re-save the base in two shards with an index, as large Hugging Face models are stored
    weights = tiny.load_np(paths[0])
    import shutil

    shutil.rmtree(paths[0])
    tiny.save_model(paths[0], tiny.llama_config(layers=4), weights, shards=2)
    return paths
