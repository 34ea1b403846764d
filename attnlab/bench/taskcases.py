"""Quality-task cases in a benchmark run (``attnlab bench --task mqar``): plan, run, store.

A :class:`TaskCase` is one training run of a task of :mod:`attnlab.bench.tasks` (``TASKS``):
the task's name, the mechanism used as token mixer, the task's whole resolved configuration
and the seed; its key is the canonical JSON of those four, so a resumed run skips the task
cases it already stored, as it does efficiency cases. A case runs under the same per-case
budget and statuses as an efficiency case (``ok``, ``unsupported``, ``oom``, ``timeout``,
``error``; one failing case never ends the run). The task's result dict is stored whole as JSON
(``task_cases.result``); its numbers, flattened with dotted names for nested dicts, become
``task_measurements`` rows (booleans as 0/1; the conformance column's "not applicable" as NULL),
which the report and the CSV export read.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .store import Store, canonical, now

#: Units of the task metrics the report knows; any other number is stored without a unit.
UNITS = {"accuracy": "fraction", "chance": "fraction", "majority_baseline": "fraction", "mse": "MSE",
         "ridge_mse": "MSE", "null_mse": "MSE", "state_size": "floats", "state_size_model": "floats",
         "train_seconds": "s", "steps": "steps", "lr": "lr"}
#: The conformance column every task result carries (``attnlab.bench.tasks``): True, False or None
#: (not applicable), stored as 1 / 0 / NULL with unit ``bool``; ``conformance_detail`` says why.
CONFORMANCE = ("causal_consistent", "incremental_equal")


@dataclass(frozen=True)
class TaskCase:
    task: str
    mechanism: str
    config: Dict[str, Any] = field(hash=False)
    seed: int = 0

    def key(self) -> str:
        return canonical({"task": self.task, "mechanism": self.mechanism, "config": self.config, "seed": self.seed})

    @property
    def label(self) -> str:
        return f"{self.task} {self.mechanism}"


@dataclass
class TaskResult:
    case: TaskCase
    status: str = "ok"
    message: Optional[str] = None
    result: Optional[Dict[str, Any]] = None
    measurements: List[Tuple[str, Optional[float], str]] = field(default_factory=list)
    started: Optional[str] = None
    seconds: Optional[float] = None
    case_id: Optional[int] = None
    stored: bool = False

    def value(self, name: str) -> Optional[float]:
        return next((v for n, v, _ in self.measurements if n == name), None)

    @classmethod
    def from_stored(cls, row: Dict[str, Any]) -> "TaskResult":
        case = TaskCase(row["task"], row["mechanism"], row["config"], row["seed"])
        ms = [(n, m["value"], m["unit"]) for n, m in row["measurements"].items()]
        return cls(case, row["status"], row["message"], row["result"], ms, row["started"], case_id=row["id"],
                   stored=True)


def tasks():
    """``attnlab.bench.tasks.TASKS`` (imported on demand: it builds models)."""
    from .tasks import TASKS

    return TASKS


def plan(task_names: Sequence[str], mechanisms: Sequence[str], size: str,
         seeds: Sequence[int] = (0,)) -> List[TaskCase]:
    """Every task x mechanism x configuration of ``size`` x seed. Raises ValueError naming what is unknown."""
    registry = tasks()
    out = []
    for name in task_names:
        if name not in registry:
            raise ValueError(f"--task: each must be one of {', '.join(registry)} (or 'all'), got {name!r}")
        configs = registry[name].default_configs(size)
        for mech in mechanisms:
            for config in configs:
                for seed in seeds:
                    out.append(TaskCase(name, mech, config, seed))
    return out


def _run_task(case: TaskCase) -> Dict[str, Any]:
    from . import tasks as t

    run = getattr(t, "run_task", None)
    if run is not None:
        return run(case.task, case.mechanism, dict(case.config), case.seed)
    return t.TASKS[case.task].run(case.mechanism, dict(case.config), case.seed)


def flatten(result: Dict[str, Any], prefix: str = "") -> List[Tuple[str, float, str]]:
    """The numbers of a task result as ``(dotted name, value, unit)`` (booleans 0/1; lists skipped)."""
    out = []
    for k, v in result.items():
        name = f"{prefix}{k}"
        if v is None and k in CONFORMANCE:
            out.append((name, None, "bool"))
        elif isinstance(v, dict):
            out += flatten(v, name + ".")
        elif isinstance(v, bool):
            out.append((name, float(v), "bool"))
        elif isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
            x = float(v)
            out.append((name, x if math.isfinite(x) else None, UNITS.get(k, "")))
    return out


def run_case(case: TaskCase, timeout: float) -> TaskResult:
    """Train and evaluate one task case; never raises (except KeyboardInterrupt)."""
    from .runner import CaseTimeout, _caused_by, _is_oom, deadline

    res = TaskResult(case, started=now())
    t0 = time.perf_counter()
    try:
        with deadline(timeout) as dl:
            dl.stage = f"training {case.label}"
            res.result = _run_task(case)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - one failing case never ends the run
        timeout_exc = _caused_by(exc, CaseTimeout)
        if timeout_exc is not None:
            res.status, res.message = "timeout", str(timeout_exc)
        elif isinstance(exc, NotImplementedError):
            res.status, res.message = "unsupported", f"{type(exc).__name__}: {exc}"
        else:
            res.status = "oom" if _is_oom(exc) else "error"
            res.message = f"{type(exc).__name__}: {exc}"
    res.seconds = time.perf_counter() - t0
    res.measurements = flatten(res.result or {}) + [("wall_s", res.seconds, "s")]
    return res


def run(cases: Sequence[TaskCase], timeout: float, store: Optional[Store] = None, run_id: Optional[int] = None,
        on_start: Callable[[int, int, Any], None] = lambda i, n, c: None,
        on_done: Callable[[int, int, Any], None] = lambda i, n, r: None, *, offset: int = 0, total: int = 0,
        done: Optional[Dict[str, TaskResult]] = None) -> List[TaskResult]:
    """Run task cases (skipping those in ``done``, by key), storing each as it finishes."""
    done = done or {}
    total = total or len(cases)
    out = []
    for i, case in enumerate(cases):
        on_start(offset + i, total, case)
        res = done.get(case.key())
        if res is None:
            res = run_case(case, timeout)
            if store is not None:
                res.case_id = store.add_task_case(run_id, case.key(), task=case.task, mechanism=case.mechanism,
                                                  config=case.config, seed=case.seed, status=res.status,
                                                  message=res.message, result=res.result,
                                                  measurements=res.measurements, started=res.started)
        out.append(res)
        on_done(offset + i, total, res)
    return out


__all__ = ["CONFORMANCE", "TaskCase", "TaskResult", "plan", "run", "run_case", "flatten", "tasks"]
