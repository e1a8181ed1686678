"""scripts/gpu_check.py in its dry mode (CPU, reduced shapes): every section runs and reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenprune.config import PROJECT_ROOT


@pytest.mark.slow
@pytest.mark.integration
def test_gpu_check_dry_run_writes_every_section(tmp_path):
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["env", "parity", "reducers", "prefill", "throughput", "lora"]
    assert not [name for name, body in sections.items() if "error" in body], done.stdout + done.stderr
    assert done.returncode == 0
    parity = sections["parity"]
    assert parity["ok"] and parity["failures"] == parity["errors"] == 0
    assert parity["passed"] >= 10  # the gpu-marked tests really ran (on the CPU), not only skipped
    prefill = {row["reducer"]: row for row in sections["prefill"]["rows"]}
    assert prefill["none"]["visual_tokens"] == 576 and prefill["uniform"]["visual_tokens"] == 144
    assert prefill["visionzip"]["visual_tokens"] == 64 and prefill["divprune"]["visual_tokens"] == 56
    assert prefill["llm_layer K=1 keep 25%"]["layer_tokens"] == [144]
    assert prefill["divprune"]["analytic_speedup"] > prefill["uniform"]["analytic_speedup"] > 1
    assert [row["reducer"] for row in sections["lora"]["rows"]] == ["none", "prumerge_plus"]
    assert (tmp_path / "report.md").read_text().startswith("# GPU check")
