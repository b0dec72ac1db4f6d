"""What a fresh clone needs: README links that resolve inside the repository, and a set-up
script that says what it is doing."""

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_links_resolve_inside_the_repository():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")}
    assert targets, "the README links its docs"
    for target in sorted(targets):
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT), f"README links {target}, outside the repository (absent from a clone)"
        assert path.exists(), f"README links {target}, which does not exist"
    for doc in ("docs/METHOD.md", "docs/DESIGN.md"):
        assert doc in targets, f"README links {doc}"


def _fake(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_setup_says_what_it_is_doing_and_shows_pip(tmp_path):
    """bin/setup in a scratch copy, with a fake interpreter and pip that record their calls."""
    (tmp_path / "bin").mkdir()
    shutil.copy(ROOT / "bin" / "setup", tmp_path / "bin" / "setup")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    calls = tmp_path / "calls.log"
    venv_bin = tmp_path / ".venv" / "bin"
    # the base interpreter creates a venv whose python has no torch and whose pip logs its arguments
    _fake(tmp_path / "python3", f"""
if [ "$1" = "--version" ]; then echo "Python 3.11.0"; exit 0; fi
mkdir -p {venv_bin}
cat > {venv_bin}/python <<'EOS'
#!/usr/bin/env bash
exit 1
EOS
printf '#!/usr/bin/env bash\\necho "pip $*" >> {calls}\\necho "Collecting something"\\n' > {venv_bin}/pip
chmod +x {venv_bin}/python {venv_bin}/pip
""")
    env = {**os.environ, "PYTHON": str(tmp_path / "python3")}
    first = subprocess.run(["bash", str(tmp_path / "bin" / "setup")], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    said = [line for line in first.stdout.splitlines() if line.startswith("setup: ")]
    assert [line.split(":")[1].strip() for line in said[:3]] == ["step 1/3", "step 2/3", "step 3/3"], first.stdout
    assert "creating .venv with Python 3.11.0" in said[0] and "torch" in said[1] and "pyproject.toml" in said[2]
    assert said[-1].startswith("setup: done in ")
    assert "Collecting something" in first.stdout  # pip's own progress is shown
    pip_calls = calls.read_text().splitlines()
    assert len(pip_calls) == 2 and all(" -q" not in c for c in pip_calls), pip_calls
    again = subprocess.run(["bash", str(tmp_path / "bin" / "setup")], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("setup: .venv is up to date")
    assert len(calls.read_text().splitlines()) == 2  # nothing reinstalled
