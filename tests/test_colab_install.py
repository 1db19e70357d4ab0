"""The notebooks' first cell outside the repository, as on Colab: a fresh virtual environment that sees the project
environment's packages (Colab's preinstalled jax, numpy, ...) but not lepton_jax, the package installed by the cell
from a wheel built here (no network: --no-index --no-deps), then ``digits_cnn`` loaded by name."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from tests.conftest import ROOT

CHECK = """
from lepton_jax.config import load_config
config = load_config("digits_cnn", ["num_epochs=2"])
print("LOADED", config.model.name, config.num_epochs, lepton_jax.__file__)
"""


def first_code_cell(name: str) -> str:
    notebook = nbformat.read(ROOT / "experiments" / f"{name}.ipynb", as_version=4)
    return next(c.source for c in notebook.cells if c.cell_type == "code")


@pytest.mark.slow
def test_first_cell_installs_a_wheel_outside_the_repository_and_loads_a_config_by_name(tmp_path):
    cell = first_code_cell("quickstart")
    assert cell == first_code_cell("research")
    source = tmp_path / "src"  # build from a copy: nothing is written into the checkout
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name if source.exists() else _mkdir(source) / name)
    shutil.copytree(ROOT / "lepton_jax", source / "lepton_jax", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "wheels"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheels").glob("lepton_jax-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the preinstalled packages: the project environment's site-packages on the path (its .pth files, such as
    # the editable lepton_jax install, are not processed from there, so lepton_jax itself is not visible)
    Path(purelib, "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env.update(JAX_PLATFORMS="cpu", LEPTON_JAX_SOURCE=f"--no-deps --no-index {wheel}")
    outside = _mkdir(tmp_path / "notebooks")
    before = subprocess.run([str(python), "-c", "import importlib.util, jax; "
                             "print(importlib.util.find_spec('lepton_jax'))"], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=120)
    assert before.returncode == 0 and before.stdout.strip() == "None", before.stderr[-2000:]

    proc = subprocess.run([str(python), "-c", cell + "\n" + CHECK], cwd=outside, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = next(line for line in proc.stdout.splitlines() if line.startswith("LOADED")).split()
    assert loaded[1:3] == ["cnn", "2"] and Path(loaded[3]).is_relative_to(venv), proc.stdout
    version = subprocess.run([str(python), "-m", "lepton_jax", "--version"], cwd=outside, env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("lepton-jax "), version.stderr[-2000:]

    env.pop("LEPTON_JAX_SOURCE")  # a second fresh environment with no source: one clear message
    shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    Path(purelib, "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(python), "-c", cell], cwd=outside, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "git clone" in proc.stderr.strip().splitlines()[-1]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
