"""scripts/build_deps.sh, which `make setup` runs first: it finds what a fresh Debian machine lacks for the
demo (python3-venv, a C++ compiler, the interpreter's headers: DeepSpeed compiles its CPU ops on first use)
and names it. Run with a PATH holding only a stub `id` (not root), so nothing is installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_deps.sh"


def run(tmp_path: Path, python: str, with_compiler: bool) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    if with_compiler:
        (bin_dir / "c++").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "c++").chmod(0o755)
    return subprocess.run(["/bin/sh", str(SCRIPT), python], capture_output=True, text=True,
                          env={"PATH": str(bin_dir)}, timeout=60)


def test_a_machine_without_compiler_venv_or_headers_is_told_what_to_install(tmp_path):
    broken = tmp_path / "python"  # an interpreter that can import nothing: no venv/ensurepip, no headers
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    r = run(tmp_path, str(broken), with_compiler=False)
    assert r.returncode == 0, r.stderr
    assert "missing: python3-venv g++ python3-dev" in r.stderr
    assert "not root or no apt-get" in r.stderr


def test_a_complete_machine_needs_nothing(tmp_path):
    r = run(tmp_path, sys.executable, with_compiler=True)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
