"""Quality tasks: tiny models trained on CPU with any catalogue entry as the token mixer.

=================  ==========================================================================
``mqar``           multi-query associative recall (Zoology): accuracy against state size
``listops``        LRA ListOps at short lengths: 10-way accuracy
``icl_regression`` in-context linear regression: MSE against context length beside ridge
=================  ==========================================================================

Interface used by ``attnlab bench --task``::

    TASKS[name].default_configs(preset)          # preset: tiny (tests), quick, standard, full
    run_task(name, mechanism, config, seed)      # -> flat JSON-able dict of metrics

``config`` is a (partial) configuration of the task; missing keys take the task's defaults
(``TASKS[name].defaults``) and unknown keys raise ValueError. ``config["params"]`` are the
mechanism's parameters. Every result carries the conformance column
(:mod:`.conformance_column`): ``causal_consistent``, ``incremental_equal`` and
``conformance_detail``. Models, the training loop and the configuration keys shared by every task
are in :mod:`.train`; the model builder is :func:`attnlab.models.build_hybrid`.
"""
from __future__ import annotations

from typing import Dict

from . import conformance_column as _column
from .icl_regression import TASK as _icl
from .listops import TASK as _listops
from .mqar import TASK as _mqar
from .train import Task, head_dims, seed_all

TASKS: Dict[str, Task] = {t.name: t for t in (_mqar, _listops, _icl)}
PRESETS = ("tiny", "quick", "standard", "full")


def run_task(name: str, mechanism: str, config: dict, seed: int) -> dict:
    """Train and evaluate task ``name`` with ``mechanism`` as the token mixer; see the module docstring.

    Validates the task name, the mechanism name, the configuration and the seed before any work.
    """
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    if not isinstance(mechanism, str):
        raise TypeError(f"mechanism must be a catalogue name (str), got {type(mechanism).__name__}")
    from ...catalogue import mechanism as _lookup

    _lookup(mechanism)  # KeyError naming the unknown mechanism, with close names
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    task = TASKS[name]
    cfg = task.resolve(config)
    seed_all(seed)
    metrics = task.run(mechanism, cfg, seed)
    heads, head_dim, value_dim = head_dims(cfg)
    column = _column.conformance_column(mechanism, cfg["params"], heads=heads, head_dim=head_dim, value_dim=value_dim)
    metrics.update(causal_consistent=column["causal_consistent"], incremental_equal=column["incremental_equal"],
                   conformance_detail=column["detail"])
    return metrics


__all__ = ["PRESETS", "TASKS", "Task", "run_task"]
