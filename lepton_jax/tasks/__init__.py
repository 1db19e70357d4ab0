"""What is learned: a *task* supplies the loss, the metrics, the model's output size, how outputs become predictions
and what the lake table must hold. Named by ``config.task.name``: a built-in (``classification``, ``regression``,
``multilabel``, ``dense``) or an import path ``package.module:Task`` (see :mod:`lepton_jax.plugins`);
docs/tasks.md describes the interface."""

from __future__ import annotations

from typing import Any

from lepton_jax import plugins
from lepton_jax.errors import ConfigError
from lepton_jax.tasks.base import Task
from lepton_jax.tasks.classification import Classification
from lepton_jax.tasks.dense import Dense
from lepton_jax.tasks.multilabel import MultiLabel
from lepton_jax.tasks.regression import Regression

TASKS: dict[str, type[Task]] = {"classification": Classification, "regression": Regression, "multilabel": MultiLabel,
                                 "dense": Dense}

__all__ = ["TASKS", "Classification", "Dense", "MultiLabel", "Regression", "Task", "make_task", "run_schema",
           "task_class"]


def task_class(name: str) -> type[Task]:
    """The class ``task.name`` names (built-in or ``package.module:Task``)."""
    if name in TASKS:
        return TASKS[name]
    if plugins.is_import_path(name):
        return plugins.load_object(name, "task")
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}, or an import path "
                      "package.module:Task")


def make_task(config: Any, schema: dict[str, Any]) -> Task:
    """The task of a (run's) config for a table ``schema``; the table must hold what the task needs."""
    cls = task_class(config.task.name)
    task = cls(schema)
    if not isinstance(task, Task):  # a plug-in with the same methods: Task.__init__ checks the schema
        task.check_schema()
    return task


def run_schema(config: Any, schema: dict[str, Any], train_stats: dict[str, Any]) -> dict[str, Any]:
    """The schema a run saves (and the registry copies): the table's, plus what the task derives from the train
    split's statistics (regression: the target mean/std it standardises with). Classification keeps it as is."""
    return task_class(config.task.name).fit_schema(schema, train_stats)
