"""The notebooks in experiments/ run top to bottom in a real Jupyter kernel; their own asserts are the checks."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT

NOTEBOOKS = sorted((ROOT / "experiments").glob("*.ipynb"))


def kernel_env() -> dict[str, str]:
    """The test session's environment without the 8 simulated devices: the kernel (and the scripts it starts) sees
    one CPU device, as a laptop's or Colab's CPU runtime does. The mesh paths run in their own tests; on 8 simulated
    devices the quickstart took 122 s instead of 29 s here (`pytest --durations`; its attacks shard every batch 8
    ways)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "XLA_FLAGS": " ".join(flags)}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=kernel_env())
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(o.get("output_type") == "stream" for o in outputs)
    if path.stem == "quickstart":  # the kernel saw one device (kernel_env), as a laptop's or Colab's CPU runtime
        printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
        assert "devices: [CpuDevice(id=0)]\n" in printed
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # quickstart: learning curves, confusion matrix, robustness curve; research: the runs' curves (+ a Markdown table);
    # loop: accuracy and drift over time
    assert len(images) >= {"quickstart": 3, "research": 1, "loop": 1}[path.stem]
    if path.stem == "research":
        tables = [o.get("data", {}).get("text/markdown", "") for o in outputs]
        assert any(line.startswith("| run") for table in tables for line in table.splitlines())


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "research", "loop"}
