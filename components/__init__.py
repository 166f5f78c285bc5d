"""KFP components: one lightweight component per stage of a DAG, built for a given base image.

The three layers, by name: a *component* (here) maps KFP artifacts and parameters to strings and
folders and calls one *step* in ``adaptflow.steps``, nothing else; the step calls one library
*stage* function (``adaptflow.data.ingest``, ``adaptflow.training``, ``adaptflow.evaluation``...).
``pipeline.py`` holds the main DAG's components, ``compare.py`` the strategy comparison's. They
are lightweight components because ``kfp.local``'s SubprocessRunner runs only those, so the same
DAG runs on a laptop and on a cluster.
"""

from adaptflow.components.pipeline import PipelineComponents, pipeline_components

__all__ = ["PipelineComponents", "pipeline_components"]
