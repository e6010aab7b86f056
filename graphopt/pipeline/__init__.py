"""The pass manager: the pass and backend contracts, typed options, registries, instruments, the report."""

from graphopt.pipeline.backends import Artifact, Backend, register_backend
from graphopt.pipeline.manager import Pipeline, PipelineResult
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.pipeline.registry import available_backends, available_passes, export, get_backend, get_pass
from graphopt.pipeline.report import Report, StepRecord

__all__ = [
    "Pipeline", "PipelineResult", "Pass", "PassContext", "PassResult", "register_pass", "Backend", "Artifact",
    "register_backend", "available_passes", "get_pass", "available_backends", "get_backend", "export",
    "Report", "StepRecord",
]
