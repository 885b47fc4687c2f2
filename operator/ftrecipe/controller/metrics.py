"""Prometheus metrics of the operator, in a registry of their own (one per operator, so tests can run
several in one process). Served by `ftrecipe operator --metrics-port` on ``/metrics``.

* ``ftrecipe_recipes{phase}``: recipes this operator sees, by status phase (from the watch stream).
* ``ftrecipe_phase_duration_seconds{phase}``: wall time of finished phases (Job start to end; reused
  phases are not observed).
* ``ftrecipe_phase_failures_total{phase,reason}``: phases that failed, by reason (``JobFailed``,
  ``QualityGateNotMet``, ``InvalidForCluster``, …).
* ``ftrecipe_job_failures_total{phase,reason}``: failed Jobs by the Job controller's reason
  (``BackoffLimitExceeded``, ``DeadlineExceeded``, ``PodFailurePolicy``).
* ``ftrecipe_jobs_created_total{phase}``, ``ftrecipe_reconciles_total``, ``ftrecipe_status_patches_total``.
* ``ftrecipe_api_errors_total{operation}``: Kubernetes API calls that failed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ftrecipe.api.v1alpha1 import (
    DataPreparationStatus,
    EvaluationStatus,
    FinetuneRecipeStatus,
    TrainingStatus,
)
from ftrecipe.plan.cache_key import PHASES, Phase
from ftrecipe.plan.status import CONDITION_OF

Section = DataPreparationStatus | TrainingStatus | EvaluationStatus | None

STATUS_PHASES: Final = (
    "Pending",
    "PreparingData",
    "Training",
    "Evaluating",
    "Succeeded",
    "Failed",
    "Suspended",
)
# Phases last from minutes (a small dataset) to a day (a large model): buckets up to 24 h.
DURATION_BUCKETS: Final = (30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))
    _phase_of: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        r = self.registry
        self.recipes = Gauge("ftrecipe_recipes", "Recipes by status phase.", ["phase"], registry=r)
        self.phase_duration = Histogram(
            "ftrecipe_phase_duration_seconds",
            "Wall time of finished phases.",
            ["phase"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.phase_failures = Counter(
            "ftrecipe_phase_failures", "Phases that failed, by reason.", ["phase", "reason"], registry=r
        )
        self.job_failures = Counter(
            "ftrecipe_job_failures",
            "Failed Jobs, by the Job controller's reason.",
            ["phase", "reason"],
            registry=r,
        )
        self.jobs_created = Counter("ftrecipe_jobs_created", "Jobs created.", ["phase"], registry=r)
        self.reconciles = Counter("ftrecipe_reconciles", "Reconcile passes.", registry=r)
        self.status_patches = Counter("ftrecipe_status_patches", "Status patches written.", registry=r)
        self.api_errors = Counter(
            "ftrecipe_api_errors", "Kubernetes API calls that failed.", ["operation"], registry=r
        )
        for phase in STATUS_PHASES:
            self.recipes.labels(phase).set(0)

    def recipe_seen(self, key: str, phase: str | None) -> None:
        """Count ``key`` (namespace/name) under ``phase``; None when it was deleted."""
        with self._lock:
            before = self._phase_of.pop(key, None)
            if phase is not None:
                self._phase_of[key] = phase
            if before == phase:
                return
            if before is not None:
                self.recipes.labels(before).dec()
            if phase is not None:
                self.recipes.labels(phase).inc()

    def transitions(self, before: FinetuneRecipeStatus | None, after: FinetuneRecipeStatus) -> None:
        """Observe phases that finished or failed between two statuses of one recipe."""
        old = before or FinetuneRecipeStatus()
        for phase, was, now in _sections(old, after):
            if now is None or now.completed_at is None or (was is not None and was.completed_at is not None):
                continue
            if not now.cached and now.started_at is not None:
                self.phase_duration.labels(phase).observe((now.completed_at - now.started_at).total_seconds())
        if after.phase == "Failed" and old.phase != "Failed":
            conditions = {c.type: c for c in after.conditions or []}
            failed = [p for p in PHASES if (c := conditions.get(CONDITION_OF[p])) and c.status == "False"]
            ready = conditions.get("Ready")
            reason = ready.reason if ready is not None else "Unknown"
            self.phase_failures.labels(failed[0] if failed else "recipe", reason).inc()


def _sections(
    before: FinetuneRecipeStatus, after: FinetuneRecipeStatus
) -> Iterable[tuple[Phase, Section, Section]]:
    pairs: dict[Phase, tuple[Section, Section]] = {
        "data": (before.data_preparation, after.data_preparation),
        "train": (before.training, after.training),
        "evaluate": (before.evaluation, after.evaluation),
    }
    for phase in PHASES:
        was, now = pairs[phase]
        yield phase, was, now


def serve(metrics: OperatorMetrics, port: int, address: str = "0.0.0.0") -> int:
    """Serve ``/metrics`` in a daemon thread; returns the port (useful with 0)."""
    server, _thread = start_http_server(port, addr=address, registry=metrics.registry)
    return int(server.server_port)
