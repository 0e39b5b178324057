"""The test data is in the repository, complete, and unchanged from the originals."""
import filecmp

import pytest

from conftest import FIXTURES, REPO

DATA_FILES = [
    "cin256-v2.state_dict.json",
    "tiny/config.yaml",
    "tiny/model.ckpt",
    "tiny/golden.npz",
    "tiny/golden.json",
    "tiny/golden_solvers.npz",
    "tiny/golden_solvers.json",
]
ORIGINALS = REPO.parent / "shared" / "fixtures"


@pytest.mark.parametrize("name", DATA_FILES + ["README.md"])
def test_fixture_is_present(name):
    assert (FIXTURES / name).is_file() and (FIXTURES / name).stat().st_size > 0


def test_fixtures_equal_originals_where_available():
    """A consistency check for workspaces that keep the originals beside the repository."""
    if not ORIGINALS.is_dir():
        return
    different = [n for n in DATA_FILES if not filecmp.cmp(FIXTURES / n, ORIGINALS / n, shallow=False)]
    assert different == []
