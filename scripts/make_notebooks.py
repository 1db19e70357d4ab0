"""Writes the notebooks in experiments/ (run from the repo root); edit here, then regenerate.

    .venv/bin/python scripts/make_notebooks.py            # write the notebooks (no outputs)
    .venv/bin/python scripts/make_notebooks.py --execute  # and run them, storing outputs (what GitHub shows)
    .venv/bin/python scripts/make_notebooks.py --execute --only experiments/loop.ipynb   # one of them
"""

import argparse
import shutil
import tempfile

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}

INSTALL = '''# Makes lepton_jax importable in this kernel (Colab, a fresh environment) and checks jax.
# - already installed: nothing to do;
# - opened inside a clone (locally, or on Colab after `!git clone <repository URL>` and `%cd lepton_jax`):
#   `pip install -e <clone>`;
# - elsewhere: set SOURCE (or the LEPTON_JAX_SOURCE variable) to pip arguments, e.g.
#   "git+<repository URL>" or the path of a built wheel.
# A preinstalled jax (Colab's) is kept when it satisfies jax>=0.10; pip upgrades an older one to the CPU build. On a
# GPU runtime with too old a jax: `pip install -U "jax[cuda13]"` (or "lepton_jax[cuda]"), then restart the runtime.
import importlib
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys

SOURCE = os.environ.get("LEPTON_JAX_SOURCE", "")
MIN_JAX = (0, 10)

if importlib.util.find_spec("lepton_jax") is None:
    here = pathlib.Path.cwd()
    clone = next((p for p in [here, *here.parents] if (p / "pyproject.toml").exists() and (p / "lepton_jax").is_dir()),
                 None)
    if clone is not None:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)])
    elif SOURCE:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *SOURCE.split()])
    else:
        raise RuntimeError("lepton_jax is not installed: `!git clone <repository URL>` then `%cd lepton_jax` and rerun "
                           "this cell, or set SOURCE to pip arguments (git+<repository URL>, or a wheel)")
    importlib.invalidate_caches()
jax_version = importlib.metadata.version("jax")
if tuple(int(part) for part in jax_version.split(".")[:2]) < MIN_JAX:
    raise RuntimeError(f"jax {jax_version} is older than 0.10: `pip install -U jax` (CPU) or "
                       "`pip install -U 'jax[cuda13]'` (GPU), then restart the kernel")
import lepton_jax  # noqa: E402

print(f"lepton_jax {lepton_jax.__version__} from {pathlib.Path(lepton_jax.__file__).parent}, jax {jax_version}")'''

research = new_notebook(cells=[
    new_markdown_cell("# Comparing lake versions and runs\n\nTwo versions of the digits table (different split "
                      "seeds), two training runs that differ in one hyper-parameter, and how lepton_jax shows the "
                      "differences. Runs on a laptop CPU in about a minute."),
    new_code_cell(INSTALL),
    new_code_cell('''from pathlib import Path

import numpy as np

from lepton_jax import runs
from lepton_jax.config import load_config
from lepton_jax.lake import DigitsSource, Lake, ingest
from lepton_jax.train.loop import train

work = Path("research_demo")
lake = Lake(work / "lake")
CONFIG = "digits_cnn"  # a config shipped in the package, by name (a path to a config file works too)'''),
    new_markdown_cell("## Two versions of one table\n\nRe-ingesting the same source with another split seed "
                      "commits a new version; the old one stays readable (time travel)."),
    new_code_cell('''v1 = ingest(lake, "digits", DigitsSource(), seed=0).version
v2 = ingest(lake, "digits", DigitsSource(), seed=1).version
again = ingest(lake, "digits", DigitsSource(), seed=1)  # identical source and split: no new version
print("versions:", lake.versions("digits"), "| re-ingest created a version:", again.created)
for tv in (v1, v2):
    print(f"v{tv.version}: parent={tv.record['parent']} split seed={tv.record['lineage']['split']['seed']} "
          f"test class counts={tv.record['stats']['splits']['test']['class_counts']}")
assert lake.versions("digits") == [1, 2] and not again.created
same_test = np.array_equal(lake.table("digits", 1).reader("test").read()["image"],
                           lake.table("digits", 2).reader("test").read()["image"])
assert not same_test  # the two seeds put different examples in the test split'''),
    new_markdown_cell("## Two runs on a pinned version\n\nBoth runs read version 1, whatever is committed later; "
                      "they differ only in the learning rate."),
    new_code_cell('''results = {}
for lr in (3e-3, 3e-4):
    config = load_config(CONFIG, ["num_epochs=2", "data.version=1", f"optim.lr={lr}"])
    results[lr] = train(config, work / f"lr_{lr}", lake_root=lake.root, progress=False)
    print(f"lr={lr}: test accuracy {results[lr]['test_accuracy']:.4f}")
assert all(r["data_version"] == 1 for r in results.values())
assert results[3e-3]["test_accuracy"] > 0.5'''),
    new_code_cell('''from IPython.display import Image, Markdown, display

summaries = [runs.run_summary(p) for p in runs.find_runs(work)]
differences = runs.config_differences(summaries)
display(Markdown(runs.table(summaries, differences)))
assert differences == ["optim.lr"]
runs.plot_curves(runs.find_runs(work), work / "curves.png")
Image(str(work / "curves.png"))'''),
])
NOTEBOOKS = {"experiments/research.ipynb": research}

quick = new_notebook(cells=[
    new_markdown_cell("# lepton_jax quickstart\n\nThe whole pipeline on scikit-learn's bundled digits, on a laptop "
                      "CPU in about a minute: **lake** (versioned TensorStore table) → **train** (Flax CNN, Optax "
                      "AdamW, sharded `jax.jit`) → **robust evaluation** (FGSM / PGD) → **predict** from the "
                      "checkpoint."),
    new_code_cell(INSTALL),
    new_code_cell('''from pathlib import Path

import jax
import numpy as np
from IPython.display import Image, display

from lepton_jax import runs
from lepton_jax.config import load_config
from lepton_jax.data import prepare_batch
from lepton_jax.lake import DigitsSource, Lake, ingest
from lepton_jax.models.functional import make_apply
from lepton_jax.robust.evaluate import accuracy_curve, evaluate_robustness, save_curve_png, standard_attacks
from lepton_jax.serve import Predictor
from lepton_jax.train.loop import train

CONFIG = "digits_cnn"  # a config shipped in the package, by name (a path to a config file works too)
work = Path("quickstart_demo")
print("devices:", jax.devices())'''),
    new_markdown_cell("## 1. Lake: ingest, validate, split, commit"),
    new_code_cell('''lake = Lake(work / "lake")
table = ingest(lake, "digits", DigitsSource()).version
print({split: table.num_examples(split) for split in table.splits}, "| version", table.version)
print("lineage:", table.record["lineage"]["source"]["uri"], table.record["lineage"]["split"])
assert sum(table.num_examples(s) for s in table.splits) == 1797'''),
    new_markdown_cell("## 2. Train (a short run: 5 epochs)"),
    new_code_cell('''config = load_config(CONFIG, ["num_epochs=5"])
result = train(config, work / "run", lake_root=lake.root, progress=False)
print(f"test accuracy {result['test_accuracy']:.4f} (best dev {result['best_dev_accuracy']:.4f})")
print(result["report"]["report_text"])
assert result["test_accuracy"] > 0.9'''),
    new_markdown_cell("Learning curves (training loss every 10 steps, dev accuracy per epoch) and the test confusion "
                      "matrix, from the files the run wrote."),
    new_code_cell('''runs.plot_curves([work / "run"], work / "curves.png")
display(Image(str(work / "curves.png")), Image(str(work / "run" / "confusion_matrix.png"), width=420))'''),
    new_markdown_cell("## 3. Robust evaluation: how much does a small L∞ perturbation hurt?"),
    new_code_cell('''predictor = Predictor.from_workdir(work / "run")
test = table.reader("test").read_all()
x = prepare_batch({"image": test["image"]}, table.schema)["input"]  # the [0, 1] input box
robust = evaluate_robustness(make_apply(predictor.graphdef), predictor.params, x, test["label"], epsilon=0.1,
                             attacks_=standard_attacks(steps=10, restarts=1))
for name, accuracy in robust["accuracy"].items():
    print(f"{name:>14s}: {accuracy:.4f}")
print("warnings:", robust["warnings"] or "none")
assert robust["accuracy"]["worst"] <= robust["accuracy"]["clean"]'''),
    new_markdown_cell("Accuracy against the perturbation budget ε (worst case over FGSM and PGD at each ε)."),
    new_code_cell('''curve = accuracy_curve(make_apply(predictor.graphdef), predictor.params, x, test["label"],
                       [0.0, 0.05, 0.1, 0.15, 0.2], attacks_=standard_attacks(steps=10, restarts=1))
save_curve_png({"standard training": curve}, work / "robustness.png", title="digits CNN, L∞")
assert curve["worst"][0] >= curve["worst"][-1]
Image(str(work / "robustness.png"), width=480)'''),
    new_markdown_cell("## 4. Predict raw examples from the best checkpoint"),
    new_code_cell('''raw = test["image"][:8, ..., 0]  # (8, 8, 8) values in 0..16, as the source delivers them
out = predictor.predict(raw)
print("predicted:", out["class"].tolist())
print("true:     ", test["label"][:8].tolist())
assert np.mean(out["class"] == test["label"][:8]) >= 0.75'''),
])
NOTEBOOKS["experiments/quickstart.ipynb"] = quick

loop = new_notebook(cells=[
    new_markdown_cell("# Closing the loop: drift → append → fine-tune → gate → swap\n\nA server follows "
                      "`digits@production`. Half-way through, a second camera that reports inverted intensities "
                      "starts sending half the traffic: accuracy halves and input drift (PSI) jumps. The new data is "
                      "appended to the lake, a model is fine-tuned from `@production` on the new table version, the "
                      "gate compares it with production on that version's test split and promotes it, and the "
                      "following server swaps to it between batches without failing a request. This runs "
                      "`scripts/close_loop.py` (in a clone) with short settings: a few minutes on a laptop CPU; "
                      "[docs/loop.md](../docs/loop.md) has the full-length numbers."),
    new_code_cell(INSTALL),
    new_code_cell('''import json
import pathlib
import subprocess
import sys

from IPython.display import Image, display

import lepton_jax

script = pathlib.Path(lepton_jax.__file__).resolve().parents[1] / "scripts" / "close_loop.py"
if not script.exists():
    raise RuntimeError("scripts/close_loop.py is in the repository, not the wheel: run this notebook in a clone")
out = pathlib.Path("loop_demo")
subprocess.run([sys.executable, str(script), "--out", str(out), "--epochs", "3", "--finetune-epochs", "3",
                "--phase-s", "3"], check=True)
summary = json.loads((out / "loop.json").read_text())
print(json.dumps({k: summary[k] for k in ("requests", "failed_requests", "accuracy", "input_psi_median")}, indent=1))
assert summary["failed_requests"] == 0 and summary["readiness_failures"] == 0
assert summary["accuracy"]["shifted_traffic_v2"] > summary["accuracy"]["shifted_traffic_v1"] + 0.2
assert summary["input_psi_median"]["shifted_traffic_v2"] < 0.25 < summary["input_psi_median"]["shifted_traffic_v1"]
display(Image(str(out / "loop.png")))'''),
])
NOTEBOOKS["experiments/loop.ipynb"] = loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--execute", action="store_true", help="run each notebook and keep its outputs")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATH", help="write only these notebooks")
    args = parser.parse_args()
    for path, notebook in NOTEBOOKS.items():
        if args.only and path not in args.only:
            continue
        notebook.metadata["kernelspec"] = KERNELSPEC
        notebook.metadata["language_info"] = {"name": "python"}
        if args.execute:  # in a scratch directory, so the demo lakes and runs are not left in the checkout
            scratch = tempfile.mkdtemp(prefix="notebook-")
            try:
                NotebookClient(notebook, timeout=900, kernel_name="python3",
                               resources={"metadata": {"path": scratch}}).execute()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        nbformat.write(notebook, path)
        print("wrote", path, "(executed)" if args.execute else "")


if __name__ == "__main__":
    main()
