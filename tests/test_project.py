"""The project as users meet it: the README's commands, CI, a light import, the docs, the quickstart."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO_ROOT


def _readme_commands() -> list[str]:
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "the README opens with a bash block of the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_command():
    install, test = _readme_commands()
    assert install.startswith("pip install") and install.endswith("&& skproduct demo")
    ci_commands = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_commands


def test_import_is_light():
    code = "import sys, skproduct; print(sorted(m for m in ('torch', 'pandas', 'PIL', 'sklearn', 'bson') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_readme_main_job_runs_offline_and_beats_chance(tmp_path):
    """``skproduct demo`` with its defaults, as the README runs it: offline, no data, accuracy per level vs chance."""
    env = {"SKPRODUCT_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "", "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "skproduct", "demo", "--workdir", str(tmp_path / "demo"), "--quiet"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=env,
    )
    rows = re.findall(r"^\s+(\d)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", result.stdout, re.M)  # level, nodes, acc, chance
    assert [level for level, *_ in rows] == ["1", "2", "3"], result.stdout
    for _, _, accuracy, chance in rows:
        assert float(accuracy) > float(chance) + 0.3, result.stdout


def test_quickstart_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, check=True, cwd=tmp_path, env={"SKPRODUCT_CACHE_DIR": str(tmp_path), "PATH": ""},
    )
    assert "products: 200" in result.stdout
    assert "tree levels: (3, 6, 12)" in result.stdout
    assert "reopening uses the saved index: True" in result.stdout


def test_docs_build_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(REPO_ROOT / "docs"), str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
