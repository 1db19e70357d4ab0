"""One builder: a config's model on a mesh, as abstract parameters with their shardings.

Every place that needs a model from a config (the training loop and its strategies, eval, predict, robust eval,
the registry, export and the scripts) calls :func:`build`; :func:`lepton_jax.checkpoint.restore_params` restores
its parameters from a run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lepton_jax.data.transforms import input_spec
from lepton_jax.models import build_model
from lepton_jax.models.functional import count_params, split_model
from lepton_jax.parallel.rules import logical_axes, named_shardings, param_specs, rules_from_config
from lepton_jax.tasks import make_task


@dataclasses.dataclass(frozen=True)
class Built:
    """A model built from a config on a mesh: its static graph, abstract parameters (shardings attached), the
    parameter shardings and PartitionSpecs, and ``init_params()`` creating the initial parameters (plain dict)."""

    graphdef: nnx.GraphDef
    abstract_params: Any
    shardings: Any
    specs: Any
    init_params: Callable[[], Any]
    input_shape: tuple[int, ...]
    num_classes: int  # the model's output size (the task's; classes for classification)
    task: Any = None  # the config's task (lepton_jax.tasks) over the schema

    @property
    def num_params(self) -> int:
        return count_params(self.abstract_params)

    @property
    def param_bytes(self) -> int:
        return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(self.abstract_params)))


def build(config: ml_collections.ConfigDict, schema: dict[str, Any], mesh: Mesh, *,
          replicate: bool = False) -> Built:
    """``config.model`` for the lake ``schema`` (input shape, classes) on ``mesh``, parameters sharded by
    ``config.sharding`` (or fully replicated with ``replicate=True``, as inference and edge nodes use)."""
    input_shape = tuple(input_spec(schema)["example_shape"])
    task = make_task(config, schema)
    num_classes = task.output_size

    def new_model() -> nnx.Module:
        return build_model(config.model, input_shape=input_shape, num_classes=num_classes, seed=config.seed)

    abstract_model = nnx.eval_shape(new_model)
    graphdef, abstract = split_model(abstract_model)
    rules, min_size = rules_from_config(config.sharding)
    specs = param_specs(logical_axes(abstract_model), abstract, () if replicate else rules, mesh, min_size)
    shardings = named_shardings(specs, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return Built(graphdef=graphdef, abstract_params=abstract, shardings=shardings, specs=specs,
                 init_params=lambda: split_model(new_model())[1], input_shape=input_shape, num_classes=num_classes,
                 task=task)
