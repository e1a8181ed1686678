"""Labels -> mapper training -> evaluation on tiny_llava: the label job (filter counts, resume, what a
record holds) and the three entry points chained end to end on the smoke benchmark."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tokenprune.config import PROJECT_ROOT
from tokenprune.explain.labels import InstructLabelData, LabelSettings, ShapesLabelData, label
from tokenprune.explain.shards import read_labels, read_skipped

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "instruct"
BROKEN = {"no_image": 2, "missing_image": 1, "corrupt_image": 1, "no_assistant_turn": 1}


def fixture_data(turns: str = "first") -> InstructLabelData:
    return InstructLabelData(json=str(FIXTURE / "llava_instruct.json"), image_root=str(FIXTURE), turns=turns)


def test_only_correct_rejects_the_random_models_answers(tiny_llava, tmp_path):
    """The paper's filter on a random model: every answered sample is wrong, and is counted as such."""
    settings = LabelSettings(output_dir=str(tmp_path), max_new_tokens=3, progress=False)
    summary = label(tiny_llava, fixture_data(), settings)
    assert summary["labelled_samples"] == 0 and summary["records"] == 0
    assert summary["skipped_by_reason"] == {**BROKEN, "wrong_answer": 4}
    wrong = [e for e in read_skipped(tmp_path) if e["reason"] == "wrong_answer"]
    assert {e["id"] for e in wrong} == {"shapes-0001", "shapes-0002", "shapes-0004", "shapes-0008"}
    assert all("answer" in e and "reference" in e for e in wrong)


def test_records_hold_the_signal_and_the_relevance_and_resume(tiny_llava, tmp_path):
    settings = LabelSettings(
        output_dir=str(tmp_path), only_correct=False, max_new_tokens=2, shard_size=3, progress=False, limit=4
    )
    first = label(tiny_llava, fixture_data(), settings)
    assert first["labelled_samples"] == 3 and first["skipped_by_reason"] == {"no_image": 1}
    settings.limit = None
    second = label(tiny_llava, fixture_data(), settings)  # resumes: the first 4 samples are done
    assert second["this_run"]["already_done"] == 4 and second["this_run"]["labelled"] == 1
    assert second["labelled_samples"] == 4 and second["skipped_samples"] == 5
    records = {r.id: r for r in read_labels([tmp_path])}
    assert len(records) == 4 and all(r.grid == (1, 24, 24) for r in records.values())
    record = records["shapes-0001"]
    from tokenprune.data.instruct import open_image

    image = open_image(FIXTURE / "images" / "red_circle.png")
    with torch.no_grad():
        inputs = tiny_llava.prepare(["What color is the circle?"], [[image]])
        signal = tiny_llava.text_attention(inputs)[0]
        answer = tiny_llava.greedy_answer_ids(inputs, 2)[0]
    eos = tiny_llava.tokenizer.eos_token_id
    relevance = tiny_llava.answer_relevance(inputs, [[t for t in answer if t != eos]])[0]
    torch.testing.assert_close(record.text_attn, signal)  # the mapper's input is the inference signal
    torch.testing.assert_close(record.relevance, relevance)
    assert record.text_attn.shape == (576,) and float(record.relevance.sum()) > 0


def test_shapes_source_and_reference_answers(tiny_llava, tmp_path):
    data = ShapesLabelData(split="train", n=1)
    samples = list(data.samples())
    assert samples and all(s.id.startswith("shapes_train_000000#") for s in samples)
    settings = LabelSettings(
        output_dir=str(tmp_path), only_correct=False, explain="reference", progress=False, limit=2
    )
    summary = label(tiny_llava, data, settings)
    assert summary["labelled_samples"] == 2
    answers = [r.answer for r in read_labels([tmp_path])]
    assert answers == [s.reference for s in samples[:2]]  # the reference answers were explained


def run_module(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=PROJECT_ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.integration
def test_labels_train_evaluate_end_to_end(tiny_llava_path, tmp_path):
    common = ["model=tiny_llava", f"model.path={tiny_llava_path}", f"paths.outputs={tmp_path}"]
    done = run_module(
        "tokenprune.label",
        *common,
        "source=instruct_fixture",
        "label.only_correct=false",
        "label.max_new_tokens=2",
        "label.progress=false",
    )
    assert "4 samples labelled (4 records), 5 skipped" in done.stdout
    labels = tmp_path / "labels" / "tiny_llava" / "instruct_fixture"
    assert json.loads((labels / "summary.json").read_text())["skipped_by_reason"] == BROKEN
    run_module(
        "tokenprune.train",
        *common,
        "benchmark=smoke",
        "reducer=explain_mapper",
        "train=mapper",
        "train.trainer.max_epochs=3",
        "train.trainer.accelerator=cpu",
        "train.trainer.enable_progress_bar=false",
        "train.data.val_fraction=0",
        "benchmark.limit=2",
    )
    trained = json.loads(
        next((tmp_path / "results").glob("*-explain_mapper-smoke-mapper-*.json")).read_text()
    )
    assert trained["metrics"]["train/records"] == 4 and trained["metrics"]["train/steps"] == 3
    assert trained["efficiency"]["visual_tokens_mean"] == 288  # ratio 0.5 of 576
    mapper = next((tmp_path / "train").glob("tiny_llava-explain_mapper-mapper-*")) / "mapper"
    assert (mapper / "mapper.safetensors").is_file() and (mapper / "mapper.json").is_file()
    run_module(
        "tokenprune.eval",
        *common,
        "benchmark=smoke",
        "reducer=explain_mapper",
        f"reducer.checkpoint={mapper}",
        "benchmark.limit=2",
    )
    evaluated = json.loads(
        next((tmp_path / "results").glob("*-explain_mapper-smoke-none-*.json")).read_text()
    )
    assert evaluated["efficiency"]["visual_tokens_mean"] == 288

    def answers(result):
        path = tmp_path / "results" / result["samples_file"]
        return {(r["task"], r["doc_id"]): r["answer"] for r in map(json.loads, path.read_text().splitlines())}

    assert answers(evaluated) == answers(trained)  # the saved mapper is the one the fit evaluated
