"""Run every benchmark in turn and print their reports (or one JSON document with --json).

Each benchmark is also a script of its own with its own options; see its --help.
Speed is measured here, never in the tests. Quote medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("bench_spotfinding.py", "bench_analysis.py", "bench_threads.py", "bench_pipeline.py", "bench_ispyb.py",
              "bench_restore.py", "bench_broker_restart.py", "bench_failover.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="collect every report into one JSON document")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="run only these (e.g. bench_pipeline)")
    args = parser.parse_args()
    chosen = [b for b in BENCHMARKS if (HERE / b).is_file()
              and (not args.only or b.removesuffix(".py") in args.only or b in args.only)]
    reports, failed = {}, []
    for name in chosen:
        command = [sys.executable, str(HERE / name)] + (["--json"] if args.json else [])
        print(f"== {name}", file=sys.stderr)
        result = subprocess.run(command, capture_output=args.json, text=True)
        if result.returncode != 0:
            failed.append(name)
            if args.json:
                print(result.stderr, file=sys.stderr)
            continue
        if args.json:
            reports[name.removesuffix(".py")] = json.loads(result.stdout)
    if args.json:
        print(json.dumps(reports, indent=1))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
