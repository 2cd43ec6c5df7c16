"""Declarative pipelines: a DAG of steps over declared agents, written in YAML or built in Python,
both giving one :class:`PipelineSpec`. Gates, ``when`` conditions and key templates are CEL, compiled
at load time. This package loads and validates pipelines; :mod:`.engine` runs them, and
:mod:`.progress` moves a job when one of its steps starts or succeeds (what a worker calls)."""

from __future__ import annotations

from . import approvals as approvals  # registers what a decision does (mesh.broker.approvals)
from .builder import Pipeline
from .expr import (
    Condition,
    Expression,
    ExpressionError,
    ItemIdTemplate,
    KeyTemplate,
    ListExpr,
    compile_condition,
    compile_template,
)
from .loader import LoadError, PipelineError, load_pipeline, parse
from .spec import (
    Backoff,
    CheckpointingSpec,
    Compensation,
    FailureMode,
    Join,
    PipelineSpec,
    RetryPolicy,
    StepSpec,
    TracingSpec,
)
from .validate import Problem, check, order, problems, roots, upstream

__all__ = ["Backoff", "CheckpointingSpec", "Compensation", "Condition", "Expression", "ExpressionError",
           "FailureMode", "ItemIdTemplate", "Join", "KeyTemplate", "ListExpr", "LoadError", "Pipeline", "PipelineError",
           "PipelineSpec", "Problem", "RetryPolicy", "StepSpec", "TracingSpec", "check", "compile_condition",
           "compile_template", "load_pipeline", "order", "parse", "problems", "roots", "upstream"]
