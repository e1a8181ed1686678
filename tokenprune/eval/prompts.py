"""`prompt: llava15`: LLaVA-1.5's own evaluation prompts, as lmms-eval task overrides.

LLaVA-1.5's scripts (`scripts/v1_5/eval/*.sh`, vicuna_v1 conversation, greedy) and lmms-eval's
default prompts agree for VQAv2, GQA, POPE and MME (the question + "\\nAnswer the question using a
single word or phrase.", MME's " Please answer yes or no." replaced by it) and for ScienceQA
(lmms-eval's "Context: <hint>\\n<question>\\nA. ...\\nB. ...\\nAnswer with the option's letter from
the given choices directly." is the CQM-A + --single-pred-prompt text). They differ in:

* TextVQA: LLaVA-1.5 gives the OCR tokens, "<question>\\nReference OCR token: a, b, c\\nAnswer the
  question using a single word or phrase." (its llava_textvqa_val_v051_ocr.jsonl); lmms-eval's
  default leaves them out (`ocr: false`); its `ocr: true` adds them in LLaVA's format.
* MMBench: LLaVA-1.5 writes "<hint>\\n<question>\\nA. ...\\nB. ...\\nAnswer with the option's letter
  from the given choices directly." (model_vqa_mmbench.py); lmms-eval writes "<hint> <question>
  There are several options:\\nA. ...". `mmbench_llava15_doc_to_text` writes LLaVA's.
* ScienceQA images: LLaVA-1.5 used the plain CLIP preprocess (resize + centre crop) for SQA and
  pads to a square everywhere else; the override sets `image_aspect: crop` for that task
  (read by the tokenprune model class from the task's generation settings).

Values starting with "!function " are imported by the runner, as lmms-eval's YAML tag does.
"""

from __future__ import annotations

from typing import Any

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
SINGLE_LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCDE"

# task -> lmms-eval config override (deep-merged over the task's own YAML values)
LLAVA15: dict[str, dict[str, Any]] = {
    "textvqa_val": {
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": SHORT_ANSWER, "ocr": True}}
    },
    "textvqa_test": {
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": SHORT_ANSWER, "ocr": True}}
    },
    "scienceqa_img": {"generation_kwargs": {"image_aspect": "crop"}},
    "mmbench_en_dev_static": {"doc_to_text": "!function tokenprune.eval.prompts.mmbench_llava15_doc_to_text"},
    "mmbench_en_dev": {"doc_to_text": "!function tokenprune.eval.prompts.mmbench_llava15_doc_to_text"},
    "mmbench_en_test": {"doc_to_text": "!function tokenprune.eval.prompts.mmbench_llava15_doc_to_text"},
}
PROMPTS = {"lmms_eval": {}, "llava15": LLAVA15}


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def mmbench_llava15_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """LLaVA-1.5's MMBench question: hint, question, one "X. option" line per option, the instruction."""
    lines = [] if _missing(doc.get("hint")) else [str(doc["hint"])]
    lines.append(str(doc["question"]))
    for letter in OPTION_LETTERS:
        if letter in doc and not _missing(doc[letter]):
            lines.append(f"{letter}. {doc[letter]}")
    lines.append(SINGLE_LETTER)
    return "\n".join(lines)
