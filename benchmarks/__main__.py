"""``python -m benchmarks``: run every benchmark module and print ratios beside targets."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    """Run each ``benchmarks/bench_*.py`` module's ``run()`` and print a table."""
    names = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
    only = set(sys.argv[1:])
    missed = 0
    print(f"{'benchmark':<62} {'ratio':>7} {'target':>8}  result")
    for name in names:
        if only and name not in only:
            continue
        print(f"[{name}]")
        module = importlib.import_module(f"benchmarks.{name}")
        for label, ratio, target in module.run():
            # A target below 1 is a ceiling ("<= target"); a target above 1 can be either, so
            # rows name their direction with a leading ">=" in the label when higher is better.
            higher_is_better = label.startswith(">=")
            ok = ratio >= target if higher_is_better else ratio <= target
            missed += not ok
            sign = ">=" if higher_is_better else "<="
            verdict = "ok" if ok else "MISSED"
            shown = label.removeprefix(">= ")
            print(f"  {shown:<60} {ratio:7.2f} {sign}{target:6.2f}  {verdict}")
    print(f"\n{missed} target(s) missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
