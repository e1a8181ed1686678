"""The documentation: the site builds strictly (no broken link or anchor, every page in the navigation)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_docs_site_builds_strictly(tmp_path):
    # `make docs` runs the same build; --strict turns mkdocs' warnings (a link to a missing page or anchor,
    # a page left out of the navigation) into a failure
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's end-of-life banner
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "models" / "index.html").is_file()


def test_readme_is_short_and_its_links_resolve():
    # the README is the quick start (the reference lives in docs/); mkdocs checks docs/, this checks the README
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "keep the README a quick start: move reference material to docs/"
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://", "mailto:"))]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
