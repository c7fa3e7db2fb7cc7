"""The README's quick start runs as pasted and prints what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_quick_start_runs_as_pasted(tmp_path: Path) -> None:
    """The first Python block of the README (the quick start) runs in a fresh interpreter and
    prints the tenant's orders, then the tenant read back through plain OTel baggage."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    script = tmp_path / "quickstart.py"
    script.write_text(blocks[0], encoding="utf-8")
    ran = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ran.stdout.splitlines() == ["orders of acme for u-7", "acme"]
