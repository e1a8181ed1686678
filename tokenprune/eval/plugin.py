"""The `lmms_eval.models` entry point: makes `--model tokenprune` resolvable by name in lmms-eval."""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFESTS = (
    ModelManifest(model_id="tokenprune", simple_class_path="tokenprune.eval.lmms_model.TokenPruneLMM"),
)
