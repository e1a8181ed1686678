"""Every bad input of issue #21, each refused or failed the way the README promises.

Config and environment mistakes are refused before any model loads, with one line naming the
problem and the fix (`UserError`; exit status 2 from the command line) and nothing written; a bad
image or a non-finite signal fails its own sample, counted and listed with its reason.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tokenprune.config import PROJECT_ROOT, UserError, compose

CORRUPT_DIR = PROJECT_ROOT / "tests" / "fixtures" / "smoke_corrupt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def eval_cfg(tmp_path: Path, *overrides: str, model_path: Path | None = None, config: str = "eval"):
    """A tiny_llava config whose outputs live in tmp_path; its model folder is never built unless loaded."""
    model = [] if any(o.startswith("model=") for o in overrides) else ["model=tiny_llava"]
    model += [f"model.path={model_path or tmp_path / 'never_built'}"] if model else []
    return compose(
        [*model, "benchmark=smoke", f"paths.outputs={tmp_path / 'outputs'}", *overrides],
        config_name=config,
    )


def refused(tmp_path: Path, *overrides: str, config: str = "eval", match: str) -> str:
    """Run the config; it must raise a one-line UserError before loading a model or writing anything."""
    from tokenprune.train.pipeline import run

    cfg = eval_cfg(tmp_path, *overrides, config=config)
    with pytest.raises(UserError, match=match) as error:
        run(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert not (tmp_path / "never_built").exists(), "the model was loaded (built) before the check"
    assert not (tmp_path / "outputs").exists(), "something was written for a refused run"
    return message


# ---------------------------------------------------------------------------------------- config values
@pytest.mark.slow  # every option and every experiment's every grid point (~25 s on 2 shared cores)
def test_every_shipped_option_and_experiment_passes_the_type_check():
    """No false refusals: each group option and each experiment type-checks as shipped."""
    from tokenprune.config import GROUPS, group_options
    from tokenprune.eval.preflight import check_types, check_values

    cases = [[f"{g}={o}"] for g in GROUPS for o in group_options(g)]
    cases += [[f"experiment={e}"] for e in group_options("experiment")]
    for overrides in cases:  # train.yaml: the same groups as eval.yaml, with a train stage to check
        cfg = compose(overrides, config_name="train")
        check_types(cfg)
        check_values(cfg)


def test_limit_zero_is_refused_before_the_model_loads(tmp_path):
    refused(tmp_path, "benchmark.limit=0", match=r"benchmark\.limit=0 evaluates nothing.*N >= 1")


def test_keep_of_the_wrong_type_is_refused(tmp_path):
    message = refused(
        tmp_path, "reducer=uniform", "reducer.keep=abc", match=r"reducer\.keep='abc' is not a int"
    )
    assert "reducer.keep=64" in message  # the fix


def test_literal_option_out_of_its_set_is_refused(tmp_path):
    refused(tmp_path, "reducer=prumerge", "reducer.merge=averag", match=r"reducer\.merge='averag'.*'average'")


def test_keep_at_least_the_model_tokens_is_refused(tmp_path, tiny_llava_path):
    from tokenprune.train.pipeline import run

    # the tiny LLaVA has 24 x 24 = 576 patches; keep=576 would run the unreduced model as "uniform"
    cfg = eval_cfg(tmp_path, "reducer=uniform", "reducer.keep=576", model_path=Path(tiny_llava_path))
    with pytest.raises(UserError, match=r"reducer\.keep=576 >= the 576 visual tokens.*reducer=none"):
        run(cfg)
    cfg = eval_cfg(
        tmp_path, "reducer=prumerge_plus_fixed", "reducer.budget=900", model_path=Path(tiny_llava_path)
    )
    with pytest.raises(UserError, match=r"reducer\.budget=900 >= the 576"):
        run(cfg)
    assert not (tmp_path / "outputs").exists()


def test_ratio_out_of_range_is_refused(tmp_path):
    refused(
        tmp_path, "reducer=random", "reducer.keep=null", "reducer.ratio=1.5", match=r"reducer\.ratio=1\.5"
    )


# ---------------------------------------------------------------------------------------- data and model
@pytest.mark.integration  # through lmms-eval
def test_missing_dataset_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_hf_home" / "hub"))
    refused(
        tmp_path,
        "benchmark=pope",
        f"paths.data_root={tmp_path / 'no_data'}",
        match=r"dataset 'lmms-lab-encoder/POPE' is not under paths\.data_root.*huggingface-cli download",
    )


def test_model_not_downloaded_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    refused(
        tmp_path, "model=llava15_7b", match=r"model\.path=llava-hf/llava-1\.5-7b-hf: not a local.*download"
    )


def test_training_another_model_with_the_miniature_recipe_is_refused(tmp_path):
    refused(
        tmp_path,
        "model=llava15_7b",
        "reducer=prumerge_plus",
        config="train",
        match=r"model=llava15_7b with no train=.*train=lora_paper",
    )


def test_the_miniature_recipe_is_the_default_for_the_miniature_and_explicit_otherwise():
    from tokenprune.config import choices
    from tokenprune.eval.preflight import check_recipe

    cfg = compose(["reducer=prumerge_plus"], config_name="train")
    check_recipe(cfg, choices(), ["reducer=prumerge_plus"])  # make run: the miniature, its recipe
    cfg = compose(["model=tiny_llava", "train=lora_mini"], config_name="train")
    check_recipe(cfg, choices(), ["model=tiny_llava", "train=lora_mini"])  # asked for explicitly


# ---------------------------------------------------------------------------------------- environment
def test_outputs_path_that_is_a_file_is_refused(tmp_path):
    from tokenprune.eval.preflight import check_outputs

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"a_file is a file; set paths\.outputs=DIR"):
        check_outputs(str(tmp_path / "a_file"))
    with pytest.raises(UserError, match=r"which is a file"):
        check_outputs(str(tmp_path / "a_file" / "outputs"))


def test_read_only_outputs_folder_is_refused(tmp_path):
    from tokenprune.eval.preflight import check_outputs

    locked = tmp_path / "read_only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: a read-only kernel folder instead
            locked = Path("/proc/sys")
        assert not os.access(locked, os.W_OK)
        with pytest.raises(UserError, match=r"not writable; set paths\.outputs=DIR"):
            check_outputs(str(locked / "outputs"))
    finally:
        (tmp_path / "read_only").chmod(0o755)


def test_second_identical_run_is_refused_while_the_first_is_alive(tmp_path):
    import socket

    from tokenprune.results import run_lock

    result = tmp_path / "results" / "x.json"
    result.parent.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result.with_suffix(".lock").write_text(f"{socket.gethostname()}:{first.pid}")
        with (
            pytest.raises(UserError, match=rf"another run \(pid {first.pid} .*wait for it"),
            run_lock(result),
        ):
            pass
    finally:
        first.kill()
        first.wait()
    with run_lock(result):  # its owner is gone: a stale lock is taken over
        assert result.with_suffix(".lock").read_text().endswith(f":{os.getpid()}")
        with run_lock(result):  # re-entrant in the owning process (train pipeline -> evaluation)
            pass
        assert result.with_suffix(".lock").exists()
    assert not result.with_suffix(".lock").exists()


def test_a_requeued_slurm_job_takes_over_its_own_lock_from_another_node(tmp_path, monkeypatch):
    from tokenprune.results import run_lock

    result = tmp_path / "x.json"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    result.with_suffix(".lock").write_text("other-node:1234:77_4")  # another task of the array: alive
    with pytest.raises(UserError, match="another run"), run_lock(result):
        pass
    result.with_suffix(".lock").write_text("other-node:1234:77_3")  # this task's earlier attempt
    with run_lock(result):
        assert result.with_suffix(".lock").read_text().endswith(":77_3")


def _cli(tmp_path: Path, *args: str, module: str = "tokenprune.eval") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env={**ENV, "TOKENPRUNE_OUTPUTS": str(tmp_path / "outputs"), "PATH": os.path.dirname(sys.executable)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=tiny_llava", "benchmark=smoke", "benchmark.limit=0"], "benchmark.limit=0 evaluates nothing"),
        (["-m", "reducer=none,random", "launcher=slurm"], "launcher=slurm: SLURM's srun/sbatch are not"),
        (["model=tiny_llava", "benchmark=smoke", "paths.outputs=/proc/sys/tp"], "is not writable"),
    ],
    ids=["limit0", "slurm_without_slurm", "read_only_outputs"],
)
@pytest.mark.integration  # the entry point in a subprocess
def test_command_line_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    done = _cli(tmp_path, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenprune: error: ") and message in lines[0], lines
    assert not (tmp_path / "outputs").exists()  # no outputs/runs/<date>/<time>/ for a refused command


# ---------------------------------------------------------------------------------------- images and signals
def _png(rng: np.random.Generator, size: int = 96) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bad_images_task(tmp_path_factory) -> Path:
    """A POPE-schema task of 5 rows: good, truncated PNG, undecodable bytes, no image, good (one folder
    per module, so the runner's lmms-eval TaskManager for it is built once)."""
    table = pq.read_table(CORRUPT_DIR / "data" / "pope_corrupt.parquet")
    template = table.to_pylist()[0]
    rng = np.random.default_rng(0)
    good, other = _png(rng), _png(rng)
    images = [
        {"bytes": good, "path": None},
        {"bytes": good[: len(good) // 2], "path": None},  # truncated: PIL would decode the rest as black
        {"bytes": b"not a png", "path": None},
        None,
        {"bytes": other, "path": None},
    ]
    rows = [
        {**template, "id": str(i), "question_id": str(i), "image": image} for i, image in enumerate(images)
    ]
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), folder / "data" / "bad.parquet")
    spec = (CORRUPT_DIR / "tp_smoke_corrupt.yaml").read_text()
    spec = spec.replace("task: tp_smoke_corrupt", "task: tp_bad_images").replace(
        "pope_corrupt.parquet", "bad.parquet"
    )
    (folder / "tp_bad_images.yaml").write_text(spec)
    return folder


@pytest.mark.integration  # through lmms-eval
def test_truncated_corrupt_and_missing_images_fail_their_sample_only(
    tmp_path, tiny_llava_path, bad_images_task
):
    from tokenprune.eval.runner import run

    cfg = eval_cfg(
        tmp_path,
        "reducer=uniform",
        "benchmark.tasks=[tp_bad_images]",
        f"benchmark.include_path={bad_images_task}",
        "benchmark.gen_kwargs='max_new_tokens=2'",
        model_path=Path(tiny_llava_path),
    )
    result = run(cfg)
    failed = {f["doc_id"]: f["failed"] for f in result["failures"]}
    assert sorted(failed) == [1, 2, 3], failed
    assert "truncated" in failed[1]  # never decoded as a black image and scored
    assert "UnidentifiedImageError" in failed[2]
    assert result["efficiency"]["failed_samples"] == 3 and result["efficiency"]["samples"] == 5
    assert result["efficiency"]["visual_tokens_min"] == 144  # the answered ones were reduced
    assert result["coverage"] == {"tp_bad_images": {"evaluated": 5, "size": 5}} and not result["partial"]


@pytest.mark.integration  # the eval runner through lmms-eval
def test_non_finite_signal_fails_its_sample_and_not_its_batch(
    tmp_path, tiny_llava_path, bad_images_task, monkeypatch
):
    """One NaN in one image's CLS attention: that sample fails with a reason (it used to be reduced to the
    extra token alone); the other sample of its batch is answered with its full PruMerge selection."""
    import torch

    from tokenprune.eval.runner import run
    from tokenprune.models import llava
    from tokenprune.models.llava import LlavaAdapter
    from tokenprune.reducers.prumerge import PruMerge

    real = llava.clip_cls_attention
    poisoned: dict[str, torch.Tensor] = {}

    def nan_for_one_image(layer, states, *dtype):
        attention, keys = real(layer, states, *dtype)
        if "cls" not in poisoned:  # calibration call: remember that image's CLS state
            poisoned["cls"] = states[0, 0].detach().clone()
            return attention, keys
        hit = torch.isclose(states[:, 0], poisoned["cls"], atol=1e-4).all(-1)  # [B]
        attention = attention.clone()
        attention[hit, 0] = float("nan")
        return attention, keys

    adapter = LlavaAdapter.from_pretrained(
        tiny_llava_path, reducer=PruMerge(), dtype="float32", device="cpu", image_aspect="pad"
    )
    monkeypatch.setattr(llava, "clip_cls_attention", nan_for_one_image)
    doc4 = pq.read_table(bad_images_task / "data" / "bad.parquet").to_pylist()[4]["image"]["bytes"]
    adapter.visual_tokens(adapter.preprocess([Image.open(io.BytesIO(doc4)).convert("RGB")]))  # calibrate
    cfg = eval_cfg(
        tmp_path,
        "reducer=prumerge",
        "benchmark.tasks=[tp_bad_images]",
        f"benchmark.include_path={bad_images_task}",
        "benchmark.gen_kwargs='max_new_tokens=2'",
        model_path=Path(tiny_llava_path),
    )
    result = run(cfg, adapter=adapter)
    failed = {f["doc_id"]: f["failed"] for f in result["failures"]}
    assert sorted(failed) == [1, 2, 3, 4]
    assert failed[4].startswith("NonFiniteSignal: signal vit_cls_attn has NaN/inf")
    efficiency = result["efficiency"]
    assert efficiency["samples"] == 5 and efficiency["visual_tokens_min"] > 1  # doc 0: its own selection
