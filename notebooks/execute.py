"""Run the course notebooks top to bottom with a real Jupyter kernel and save them with their outputs.

    python notebooks/execute.py                    # every notebook, outputs written back into the .ipynb
    python notebooks/execute.py 04_ppo.ipynb       # only the ones named

The .ipynb files are the source of the course: open them in Jupyter, edit and save. This script is
only for refreshing the committed outputs from a clean run (after `python pipeline.py`, the notebooks
use its checkpoints; see tiny.py). The test suite executes every notebook through `execute` below.
"""
import glob
import json
import os
import sys
import tempfile
import time

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "[0-9][0-9]_*.ipynb")))


def kernel_dir(root):
    """Write into `root` a kernelspec folder whose 'python3' runs THIS interpreter (the venv's, with torch
    and ipykernel). Put first on JUPYTER_PATH, it wins over any other 'python3' kernel (a user-level one
    could point to an interpreter without torch), and nothing needs `ipykernel install`."""
    spec = os.path.join(root, "kernels", "python3")
    os.makedirs(spec, exist_ok=True)
    with open(os.path.join(spec, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "Python 3 (rlhf)", "language": "python"}, f)
    return root


def execute(nb, cwd=HERE, timeout=600):
    """Run every cell of `nb` (in place, in memory) in a fresh kernel; raises on the first cell error."""
    import nbclient
    old = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory(prefix="rlhf-kernel-") as root:
        os.environ["JUPYTER_PATH"] = kernel_dir(root) + (os.pathsep + old if old else "")
        try:
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": cwd}}).execute()
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old
    return nb


def main():
    names = [os.path.basename(a) for a in sys.argv[1:]] or NOTEBOOKS
    if unknown := [n for n in names if n not in NOTEBOOKS]:
        raise SystemExit(f"error: no notebook {', '.join(unknown)} in notebooks/ (there are: {', '.join(NOTEBOOKS)})")
    for name in names:
        path = os.path.join(HERE, name)
        nb = nbformat.read(path, as_version=4)
        t0 = time.time()
        execute(nb)
        nbformat.write(nb, path)
        print(f"executed {name} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
