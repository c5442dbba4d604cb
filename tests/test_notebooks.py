"""The course notebooks run top to bottom with a real Jupyter kernel, and the generator reproduces them.

Each notebook is executed from an in-memory copy (the committed file is never rewritten) by nbclient,
with the notebooks folder as working directory, so `import tiny` finds notebooks/tiny.py. The kernel is
THIS interpreter (make_notebooks.kernel_dir puts a 'python3' kernelspec pointing at sys.executable first
on JUPYTER_PATH), so a fresh `pip install -r requirements.txt` is all a machine needs.

RLHF_NOTEBOOKS=tiny makes every notebook use the tiny chain (built once into a session temp folder by
the first notebook, about a minute) whatever happens to be in runs/; RLHF_OFFLINE=1 stops notebook 01
from trying to download GPT-2's tokenizer. A cell that raises fails the test with its traceback; every
notebook re-derives formulas and asserts them against the scripts, so a drift between the scripts and the
course text fails here too.
"""
import os
import sys
import time

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
sys.path.insert(0, NOTEBOOKS)
import make_notebooks  # noqa: E402

NAMES = list(make_notebooks.NOTEBOOKS)


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    """Environment for the kernels: the tiny chain in a fresh temp folder, no downloads."""
    saved = {k: os.environ.get(k) for k in ("RLHF_NOTEBOOKS", "RLHF_NOTEBOOK_CACHE", "RLHF_OFFLINE")}
    os.environ.update(RLHF_NOTEBOOKS="tiny", RLHF_NOTEBOOK_CACHE=str(tmp_path_factory.mktemp("notebook_tiny")),
                      RLHF_OFFLINE="1")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_generator_matches_the_committed_notebooks():
    """The .ipynb files are generated from make_notebooks.py: their cells must be the generator's."""
    for name in NAMES:
        committed = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        fresh = make_notebooks.build(make_notebooks.NOTEBOOKS[name])
        assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in fresh.cells], \
            f"{name} differs from make_notebooks.py: run `python notebooks/make_notebooks.py --execute`"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, notebook_env):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    t0 = time.time()
    make_notebooks.execute(nb, cwd=NOTEBOOKS, timeout=600)  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure (is the inline backend lost after a script call?)"
    # every exercise check cell ran and found its stub not implemented (the stubs ship unsolved)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.count("not implemented yet") == 3, f"{name}: expected 3 exercise check cells to report"
    print(f"{name}: {time.time() - t0:.0f}s")
