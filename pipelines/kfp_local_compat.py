"""Fixes for kfp.local bugs that adaptflow's DAGs hit, installed only for one local run.

kfp.local (``SubprocessRunner``) mis-runs two things the compiled IR gets right, so a cluster is never
affected; only the local orchestrator is patched:

- ``loop_task_outputs``: ParallelFor iterations replace upstream task-output inputs with the loop item.
- ``oneof_artifacts``: a ``dsl.OneOf`` over artifacts fails ("Expected 1 artifact in ArtifactSelectorSpec").

Each fix names the kfp versions known to need it (its gate) and is applied only there, and only inside
:func:`kfp_local_fixes`, which puts kfp's originals back when the block ends. For each fix,
tests/unit/test_kfp_local_compat.py reproduces the bug against unpatched kfp.local: it fails once an
installed kfp no longer has the bug (then drop the fix and raise kfp's minimum version), and it fails
when the installed kfp still has the bug but falls outside the gate (then widen the gate).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fix:
    name: str
    needed_by: SpecifierSet  # kfp versions known to have the bug (checked by the unit test)
    upstream: str
    install: Callable[[], contextlib.AbstractContextManager[None]]

    def applies_to(self, kfp_version: str) -> bool:
        return self.needed_by.contains(Version(kfp_version), prereleases=True)


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for the block; the original (a classmethod object too) comes back after."""
    original = vars(owner)[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


# --------------------------------------------------------------------------- ParallelFor inputs
# Upstream: no kubeflow/pipelines issue or PR found for this bug (searched 2026-11). The code comes from
# https://github.com/kubeflow/pipelines/pull/12511 (ParallelFor for the local runner); local-runner gaps
# are tracked in https://github.com/kubeflow/pipelines/issues/11793, and the open rework of local control
# flow, https://github.com/kubeflow/pipelines/pull/13313, does not mention it.
# The bug: ``kfp.local.orchestrator.task_spec_utils.create_parameter_loop_iteration_task_spec`` builds
# each iteration's task spec by turning *every* ``task_output_parameter`` input of the loop task into the
# loop item, not only the list being iterated over. A loop body that also takes another task's output
# (the compare pipeline's strategies take ``ingest``'s parent_run_id) receives the item instead.


def _loop_task_outputs() -> contextlib.AbstractContextManager[None]:
    from kfp.local.orchestrator import task_spec_utils as tsu

    build_iteration = tsu.create_parameter_loop_iteration_task_spec

    def create_parameter_loop_iteration_task_spec(
        original_task_spec: Any, loop_item: Any, loop_task_name: str
    ) -> Any:
        iteration = build_iteration(original_task_spec, loop_item, loop_task_name)
        iterated = original_task_spec.parameter_iterator.items.input_parameter
        for name, spec in original_task_spec.inputs.parameters.items():
            if spec.HasField("task_output_parameter") and name != iterated:
                iteration.inputs.parameters[name].CopyFrom(spec)  # the upstream output, as in the IR
        return iteration

    return _replaced(
        tsu, "create_parameter_loop_iteration_task_spec", create_parameter_loop_iteration_task_spec
    )


# --------------------------------------------------------------------------- dsl.OneOf artifacts
# Upstream: no kubeflow/pipelines issue or PR found for kfp.local (searched 2026-11); the nearest is the
# backend's https://github.com/kubeflow/pipelines/issues/13436 (OneOf artifact outputs on a cluster).
# The bug: ``kfp.local.orchestrator.orchestrator_utils.OrchestratorUtils.get_dag_output_artifacts``
# requires exactly one artifact selector per DAG output and raises "Expected 1 artifact in
# ArtifactSelectorSpec. Got: 2", but ``dsl.OneOf`` over artifacts compiles to one selector per branch.
# kfp 2.17 resolves OneOf for parameters only (``value_from_oneof`` in get_dag_output_parameters); the
# fix applies the same rule to artifacts: take the one branch that produced an output.


def _oneof_artifacts() -> contextlib.AbstractContextManager[None]:
    from kfp.local.orchestrator import orchestrator_utils as ou

    def get_dag_output_artifacts(cls: Any, dag_outputs_spec: Any, io_store: Any) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(
                        io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key)
                    )
                except (KeyError, ValueError):
                    continue  # that branch did not run
            if len(found) != 1:
                raise ValueError(
                    f"dsl.OneOf output {key!r}: expected one produced artifact, got {len(found)}"
                )
            outputs[key] = found[0]
        return outputs

    return _replaced(ou.OrchestratorUtils, "get_dag_output_artifacts", classmethod(get_dag_output_artifacts))


FIXES: tuple[Fix, ...] = (
    Fix(
        "loop_task_outputs",
        SpecifierSet(">=2.17,<2.18"),
        "none found; code from https://github.com/kubeflow/pipelines/pull/12511",
        _loop_task_outputs,
    ),
    Fix(
        "oneof_artifacts",
        SpecifierSet(">=2.17,<2.18"),
        "none found for kfp.local; cf. https://github.com/kubeflow/pipelines/issues/13436",
        _oneof_artifacts,
    ),
)


def installed_kfp_version() -> str:
    import kfp

    return str(kfp.__version__)


@contextlib.contextmanager
def kfp_local_fixes(kfp_version: str | None = None) -> Iterator[tuple[str, ...]]:
    """Install the fixes the installed kfp needs for the block; yield their names; restore kfp after."""
    version = kfp_version or installed_kfp_version()
    with contextlib.ExitStack() as stack:
        applied = []
        for fix in FIXES:
            if fix.applies_to(version):
                stack.enter_context(fix.install())
                applied.append(fix.name)
            else:
                log.debug("kfp %s: not applying kfp.local fix %s (gate %s)", version, fix.name, fix.needed_by)
        yield tuple(applied)
