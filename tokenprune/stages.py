"""Saving and loading a trained stage: the one place the training stage and the evaluation share.

A LoRA stage's `adapter/` folder holds the LoRA weights in peft format (`adapter_config.json`,
`adapter_model.safetensors`), the projector (`projector.safetensors`) and `train_info.json`, written
last into a staging folder that is renamed into place, so a killed save leaves no half stage.
`save_trained` writes it at the end of a fit (`tokenprune.train.lora`); `load_trained` puts it on a
freshly loaded model for the evaluation that follows and for a later
`python -m tokenprune.eval train=lora train.adapter=PATH` (`tokenprune.eval.runner`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenprune.atomic import atomic_folder, atomic_write_text

PROJECTOR_FILE = "projector.safetensors"
INFO_FILE = "train_info.json"


def save_trained(peft_model: Any, adapter: Any, folder: str | Path, info: dict[str, Any]) -> Path:
    """Write the LoRA adapter (peft format), the projector (safetensors) and train_info.json, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder) as staging:
        peft_model.save_pretrained(str(staging))
        projector = adapter.projector()
        state = {k: v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
        save_file(state, str(staging / PROJECTOR_FILE), metadata={"format": "pt"})
        atomic_write_text(staging / INFO_FILE, json.dumps(info, indent=2, default=str))
    return folder


def load_trained(adapter: Any, path: str | Path) -> Any:
    """Load a saved LoRA adapter + projector (`save_trained`) onto adapter.model, in place; returns adapter.

    The LoRA layers stay separate (not merged), so logits equal the trained model's exactly.
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not (path / "adapter_config.json").is_file() or not (path / PROJECTOR_FILE).is_file():
        raise FileNotFoundError(
            f"{path} is not a saved LoRA stage (needs adapter_config.json and {PROJECTOR_FILE}); "
            "give train.adapter=<train output folder>/adapter"
        )
    device = adapter.model.device
    PeftModel.from_pretrained(adapter.model, str(path), is_trainable=False)  # injects LoRA in place
    projector = adapter.projector()
    dtype = next(projector.parameters()).dtype
    state = {k: v.to(device=device, dtype=dtype) for k, v in load_file(str(path / PROJECTOR_FILE)).items()}
    projector.load_state_dict(state)
    adapter.model.to(device).eval()
    return adapter
