"""The course notebooks run top to bottom with a real Jupyter kernel.

The .ipynb files are the source (edited in Jupyter). Each notebook is executed from an in-memory copy
(the committed file is never rewritten) by nbclient, with the notebooks folder as working directory, so
`import tiny` finds notebooks/tiny.py. The kernel is THIS interpreter (execute.kernel_dir puts a
'python3' kernelspec pointing at sys.executable first on JUPYTER_PATH), so a fresh
`pip install -r requirements.txt` is all a machine needs.

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
import execute  # noqa: E402  (notebooks/execute.py)

NAMES = execute.NOTEBOOKS


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


def test_committed_notebooks_come_from_one_clean_run():
    """The outputs a reader sees were produced top to bottom in one kernel: every code cell ran, in order
    (`python notebooks/execute.py` refreshes them), and none of them failed."""
    assert len(NAMES) == 6, NAMES
    for name in NAMES:
        nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{name}: not one clean run"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"], f"{name}: an error output"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, notebook_env):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    t0 = time.time()
    execute.execute(nb, cwd=NOTEBOOKS, timeout=600)  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure (is the inline backend lost after a script call?)"
    # every exercise check cell ran and found its stub not implemented (the stubs ship unsolved)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.count("not implemented yet") == 3, f"{name}: expected 3 exercise check cells to report"
    print(f"{name}: {time.time() - t0:.0f}s")
