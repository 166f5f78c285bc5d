"""The adaptflow DAG: a pure factory, plus compile and local-run entry points."""

from adaptflow.pipelines.pipeline import DEFAULT_IMAGE, PIPELINE_NAME, build_pipeline, compile_pipeline

__all__ = ["DEFAULT_IMAGE", "PIPELINE_NAME", "build_pipeline", "compile_pipeline"]
