"""Edge artifacts: the inference function as a serialized ``jax.export`` module plus its weights beside it.

An artifact directory holds::

    model.jaxexport   StableHLO of ``f(weights, raw) -> logits`` with a symbolic batch dimension (preprocessing and,
                      for int8 artifacts, per-channel dequantisation happen inside)
    weights.npz       the parameters (float32, or int8 + float32 per-output-channel scales)
    manifest.json     input schema, label names, the task and how its predictions are made of the logits (``task``),
                      file digests, quantisation and its measured cost
    edge_runner.py    a loader that needs only jax + numpy (a copy of :mod:`lepton_jax.serve.edge`)

The function is exported for several platforms at once (default cpu and cuda), so one artifact serves both. Every
task whose :meth:`~lepton_jax.tasks.Task.edge_outputs` reproduce its predictions exports (the shipped ones do); the
runner applies them to the function's raw outputs, so an artifact answers what ``lepton-jax predict`` answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.data.transforms import input_array, input_bounds, input_spec, scale
from lepton_jax.errors import LeptonError
from lepton_jax.files import temp_dir
from lepton_jax.serve import edge

FUNCTION_FILE = "model.jaxexport"
WEIGHTS_FILE = "weights.npz"
RUNNER_FILE = "edge_runner.py"
DEFAULT_PLATFORMS = ("cpu", "cuda")


class ExportError(LeptonError):
    """An artifact cannot be written where asked, or with the options given."""


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel (last axis) int8: ``w ~= q * scale``."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    return q, scale


def export_artifact(workdir: str | Path | Any, out_dir: str | Path, *, step: int | None = None,
                    quantize: str | None = None, platforms: tuple[str, ...] = DEFAULT_PLATFORMS,
                    eval_split: str | None = "test", model_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exports a run's checkpoint (default: best) — or, when ``workdir`` is a registry
    :class:`~lepton_jax.serve.registry.ModelVersion`, that version's parameters stored in the lake — to
    ``out_dir``; returns the manifest.

    ``quantize="int8"`` stores every parameter with two or more dimensions as int8 with per-channel scales. With
    ``eval_split`` the artifact is compared with the float model on that split of the run's lake table (a
    classifier: accuracy of both and top-1 agreement; other tasks: the task's metrics of both and how closely their
    predictions agree), and the result is saved in the manifest.
    """
    from lepton_jax.models.functional import make_predict
    from lepton_jax.serve.predictor import Predictor

    if quantize not in (None, "int8"):
        raise ExportError(f"unknown quantisation {quantize!r}; expected none or 'int8'")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new --output directory")
    if hasattr(workdir, "restore"):  # a registry version: nothing is read from the run directory
        entry = workdir
        predictor = Predictor.from_registry(entry, devices=jax.devices()[:1])
        data, source = entry.record["data"], {"registry": entry.ref, "source_workdir": str(entry.workdir)}
    else:
        from lepton_jax.serve.predictor import read_run

        predictor = Predictor.from_workdir(workdir, step=step, devices=jax.devices()[:1])
        data, source = read_run(Path(workdir))[1]["data"], {"workdir": str(Path(workdir).resolve())}
    schema = predictor.schema
    task = {"name": predictor.task.name, "outputs": _edge_outputs(predictor)}
    lo, hi = (float(v) for v in input_spec(schema)["value_range"])
    bounds = input_bounds(input_spec(schema))  # per column for tabular tables: the training transform
    columns = {"column_ranges": input_spec(schema)["column_ranges"]} if "column_ranges" in input_spec(schema) else {}
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(jax.device_get(predictor.params))
    weights: dict[str, np.ndarray] = {}
    params_meta = []
    for i, (path, leaf) in enumerate(leaves_with_path):
        key, leaf = f"p{i:03d}", np.asarray(leaf, np.float32)
        quantized = quantize == "int8" and leaf.ndim >= 2
        if quantized:
            weights[f"{key}_q"], weights[f"{key}_scale"] = quantize_int8(leaf)
        else:
            weights[key] = leaf
        params_meta.append({"key": key, "path": jax.tree_util.keystr(path), "shape": list(leaf.shape),
                            "quantized": "int8" if quantized else None})
    predict = make_predict(predictor.graphdef)

    def infer(w: dict[str, jax.Array], raw: jax.Array) -> jax.Array:
        leaves = [w[m["key"]] if not m["quantized"] else w[f"{m['key']}_q"].astype(jnp.float32)
                  * w[f"{m['key']}_scale"] for m in params_meta]
        x = scale(raw, *bounds)
        return predict(jax.tree_util.tree_unflatten(treedef, leaves), x).astype(jnp.float32)

    batch = jax.export.symbolic_shape("batch")[0]
    weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
    input_struct = jax.ShapeDtypeStruct((batch, *predictor.example_shape), jnp.float32)
    try:
        exported = jax.export.export(jax.jit(infer), platforms=tuple(platforms))(weight_specs, input_struct)
    except (ValueError, NotImplementedError) as e:
        raise ExportError(f"cannot export for platforms {list(platforms)}: {e}") from e

    with temp_dir(out_dir) as tmp:
        (tmp / FUNCTION_FILE).write_bytes(bytes(exported.serialize()))
        np.savez_compressed(tmp / WEIGHTS_FILE, **weights)
        shutil.copyfile(edge.__file__, tmp / RUNNER_FILE)
        files = {name: {"sha256": hashlib.sha256((tmp / name).read_bytes()).hexdigest(),
                        "bytes": (tmp / name).stat().st_size} for name in (FUNCTION_FILE, WEIGHTS_FILE, RUNNER_FILE)}
        manifest = {
            "format": edge.FORMAT, "function": FUNCTION_FILE, "weights": WEIGHTS_FILE, "runner": RUNNER_FILE,
            "input": {"name": input_array(schema), "dtype": "float32",
                      "example_shape": list(predictor.example_shape), "value_range": [lo, hi],
                      **columns,
                      "batch_dimension": "symbolic",
                      "units": "raw values of the training lake table; preprocessing is inside the function"},
            "output": {"name": "logits", "dtype": "float32", "shape": ["batch", *predictor.task.output_shape],
                       "meaning": "the model's raw outputs; task.outputs turns them into predictions"},
            "task": task, "label_names": predictor.label_names, "platforms": list(exported.platforms),
            "quantization": {"scheme": quantize or "none", "per": "output channel (last axis)",
                             "params": params_meta},
            "model": {**(model_info or {}), **source, "step": predictor.step},
            "jax_version": jax.__version__, "files": files,
            "size_bytes": sum(f["bytes"] for n, f in files.items() if n != RUNNER_FILE),
        }
        if eval_split:
            manifest["evaluation"] = _compare(predictor, exported, weights, data, eval_split, task["outputs"])
        _write_json(tmp / edge.MANIFEST, manifest)
        if out_dir.exists():
            _move_into(tmp, out_dir)
        else:
            os.rename(tmp, out_dir)
    return manifest


def _edge_outputs(predictor) -> list[dict[str, Any]]:
    """The task's :meth:`~lepton_jax.tasks.Task.edge_outputs`, checked: on a probe batch (the input range's low,
    high and middle values) the runner's :func:`~lepton_jax.serve.edge.postprocess` of the model's outputs must
    give the task's own predictions (same names, shapes, dtype kinds and values), else one :class:`ExportError`."""
    task = predictor.task
    name = getattr(task, "name", type(task).__name__)
    edge_outputs = getattr(task, "edge_outputs", None)
    if edge_outputs is None:
        raise ExportError(f"task {name!r} has no edge_outputs(); subclass lepton_jax.tasks.Task (docs/tasks.md)")
    outputs = json.loads(json.dumps([{"name": k, **v} for k, v in edge_outputs().items()]))  # as the manifest holds
    lo, hi = (np.broadcast_to(np.asarray(b, np.float32), predictor.example_shape[-1:])
              for b in input_bounds(input_spec(predictor.schema)))
    probe = np.stack([np.broadcast_to(v, predictor.example_shape) for v in (lo, hi, (lo + hi) / 2)])
    logits = predictor.logits(probe)
    try:
        expected = {k: np.asarray(v) for k, v in task.predictions(logits).items()}
        got = edge.postprocess(outputs, logits)
    except (ValueError, TypeError, KeyError) as e:
        raise ExportError(f"task {name!r}: its edge_outputs() cannot be applied: {e}") from e
    why = None
    if list(got) != list(expected):
        why = f"they name {list(got)}, its predictions {list(expected)}"
    else:
        for k, value in got.items():
            ref = expected[k]
            if value.shape != ref.shape or value.dtype.kind != ref.dtype.kind or not np.allclose(value, ref,
                                                                                               rtol=1e-5, atol=1e-6):
                why = f"{k!r} differs from its prediction ({value.dtype}{list(value.shape)} vs {ref.dtype}" \
                      f"{list(ref.shape)})"
                break
    if why:
        raise ExportError(f"task {name!r}: its edge_outputs() do not reproduce its predictions ({why}); describe "
                          "them with the runner's ops (docs/tasks.md) or serve the model with lepton-jax serve")
    return outputs


def _compare(predictor, exported, weights, data: dict[str, Any], split: str,
             outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The float model and the artifact on ``split`` of the lake table version ``data`` names. A classifier:
    accuracy of both and how often their top-1 classes agree. Other tasks: the task's metrics of both and, per
    prediction, the fraction of equal entries (integer outputs: classes, masks, labels) or the largest absolute
    difference (float outputs)."""
    from lepton_jax.data.transforms import LABEL, prepare_batch
    from lepton_jax.lake import Lake

    examples = Lake(data["lake"]).table(data["table"], data["version"]).reader(split).read_all()
    raw = predictor.validate(examples[input_array(predictor.schema)])
    artifact_logits = np.asarray(exported.call(weights, raw.astype(np.float32)))
    if predictor.task.name == "classification":
        labels = examples["label"]
        reference = predictor.predict(raw)["class"]
        artifact = artifact_logits.argmax(-1)
        return {"split": split, "num_examples": int(labels.shape[0]),
                "float_accuracy": float(np.mean(reference == labels)),
                "artifact_accuracy": float(np.mean(artifact == labels)),
                "top1_agreement": float(np.mean(artifact == reference))}
    targets = prepare_batch(examples, predictor.schema)[LABEL]
    float_logits = predictor.logits(raw)
    reference, artifact = edge.postprocess(outputs, float_logits), edge.postprocess(outputs, artifact_logits)
    agreement, difference = {}, {}
    for k, ref in reference.items():
        if ref.dtype.kind in "iub":
            agreement[k] = float(np.mean(artifact[k] == ref)) if ref.size else 1.0
        else:
            difference[k] = float(np.abs(artifact[k] - ref).max()) if ref.size else 0.0
    return {"split": split, "num_examples": int(raw.shape[0]),
            "metric": predictor.task.best_metric[0],
            "float_metrics": predictor.task.metrics(float_logits, targets),
            "artifact_metrics": predictor.task.metrics(artifact_logits, targets),
            "agreement": agreement, "max_abs_difference": difference}


def artifact_size(directory: str | Path) -> int:
    """Bytes of the function and the weights (what an edge node must download besides the runner)."""
    directory = Path(directory)
    return (directory / FUNCTION_FILE).stat().st_size + (directory / WEIGHTS_FILE).stat().st_size


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _move_into(tmp: Path, out_dir: Path) -> None:
    """``out_dir`` exists but is empty: move the files in one by one, the manifest last."""
    for name in sorted(os.listdir(tmp), key=lambda n: n == edge.MANIFEST):
        os.rename(tmp / name, out_dir / name)
