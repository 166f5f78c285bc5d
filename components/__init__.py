"""KFP components: one lightweight component per stage, built for a given base image.

Each component body imports ``adaptflow`` (installed in the image) and calls one step in
``adaptflow.steps``; nothing else. They are lightweight components because ``kfp.local``'s
SubprocessRunner runs only those, so the same DAG runs on a laptop and on a cluster.
"""

from adaptflow.components.stages import StageComponents, stage_components

__all__ = ["StageComponents", "stage_components"]
