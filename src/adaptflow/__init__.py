"""adaptflow: adapt pretrained vision backbones to your own images.

Transfer learning first; fine-tuning only when the measurements say it pays. The same
six-stage DAG runs on Kubeflow Pipelines and, through ``kfp.local``, on one machine.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adaptflow")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
