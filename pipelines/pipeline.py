"""``build_pipeline(settings)``: the six-stage DAG as a KFP v2 pipeline. A pure factory.

ingest -> baseline -> [dsl.If should_finetune] finetune | [dsl.Else] keep_baseline
       -> dsl.OneOf(candidate) -> evaluate -> export -> register

Caching: ingest, evaluate and register never cache (they read mutable state: the source and the
registry). Every other stage takes the data fingerprint and the config hash as inputs, so KFP's
cache key (parameter values + artifact names) changes whenever the data or the config does.
"""

from pathlib import Path
from typing import Any

from adaptflow.components import stage_components
from kfp import compiler, dsl

from adaptflow import __version__
from adaptflow.config import Settings

PIPELINE_NAME = "adaptflow"
DEFAULT_IMAGE = f"ghcr.io/adaptflow/adaptflow:{__version__}"


def build_pipeline(settings: Settings, image: str = DEFAULT_IMAGE, name: str = PIPELINE_NAME) -> Any:
    c = stage_components(image)
    default_config = settings.to_json()

    @dsl.pipeline(
        name=name,
        description="Adapt a pretrained vision backbone: transfer learning, fine-tuning when it pays, "
        "evaluation against the champion, ONNX export, gated registry promotion.",
    )
    def adaptflow_pipeline(
        data_uri: str, config_json: str = default_config, parent_run_id: str = ""
    ) -> dsl.Artifact:
        ingest = c.ingest(data_uri=data_uri, config_json=config_json, parent_run_id=parent_run_id)
        ingest.set_caching_options(enable_caching=False).set_display_name("ingest")
        run_id = ingest.outputs["parent_run_id"]
        fingerprint = ingest.outputs["fingerprint"]
        config_hash = ingest.outputs["config_hash"]
        baseline = c.baseline(
            snapshot=ingest.outputs["snapshot"],
            config_json=config_json,
            parent_run_id=run_id,
            fingerprint=fingerprint,
            config_hash=config_hash,
        ).set_display_name("baseline (transfer learning)")
        with dsl.If(baseline.outputs["should_finetune"] == True, name="finetune-pays"):  # noqa: E712
            tuned = c.finetune(
                snapshot=ingest.outputs["snapshot"],
                baseline=baseline.outputs["result"],
                config_json=config_json,
                parent_run_id=run_id,
                fingerprint=fingerprint,
                config_hash=config_hash,
            ).set_display_name("finetune")
        with dsl.Else(name="keep-baseline"):
            kept = c.keep_baseline(baseline=baseline.outputs["result"]).set_display_name("keep baseline")
        selected = dsl.OneOf(tuned.outputs["candidate"], kept.outputs["candidate"])
        evaluate = c.evaluate(
            snapshot=ingest.outputs["snapshot"],
            baseline=baseline.outputs["result"],
            selected=selected,
            config_json=config_json,
            parent_run_id=run_id,
            fingerprint=fingerprint,
        ).set_display_name("evaluate vs champion")
        evaluate.set_caching_options(enable_caching=False)
        export = c.export(
            evaluation=evaluate.outputs["evaluation"],
            baseline=baseline.outputs["result"],
            selected=selected,
            config_json=config_json,
            parent_run_id=run_id,
            fingerprint=fingerprint,
            config_hash=config_hash,
        ).set_display_name("onnx export")
        register = c.register(
            snapshot=ingest.outputs["snapshot"],
            baseline=baseline.outputs["result"],
            selected=selected,
            evaluation=evaluate.outputs["evaluation"],
            onnx_model=export.outputs["onnx_model"],
            config_json=config_json,
            parent_run_id=run_id,
        ).set_display_name("register + gate")
        register.set_caching_options(enable_caching=False)
        return register.outputs["registration"]

    return adaptflow_pipeline


def compile_pipeline(settings: Settings, output: str | Path, image: str = DEFAULT_IMAGE) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings, image), str(out))
    return out
