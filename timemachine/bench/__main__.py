"""``python -m timemachine.bench [--quick] [--json PATH] [--out DIR]``."""

from __future__ import annotations

import argparse
import os
import sys
import time

from timemachine.bench.report import markdown, write_json, write_report
from timemachine.bench.suite import FULL, QUICK, run_suite


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m timemachine.bench",
        description="Benchmarks against OpenMM (plain MD, finite differences) and JAX MD "
        "(forward-mode autodiff), reverse mode, and scaling in P and N.",
    )
    parser.add_argument("--quick", action="store_true", help="reduced run (a few minutes)")
    parser.add_argument("--json", default=None, help="where to write the JSON results")
    parser.add_argument("--out", default="bench-out", help="output folder (report, plots)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the dx/dθ methods in this process (faster; peak memory then not per method)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.in_process:
        import dataclasses

        settings = dataclasses.replace(settings, isolate=False)

    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    partial = os.path.join(args.out, "partial.json")

    def checkpoint(result):  # the parts so far, in case the run is cut short
        if not result["complete"]:
            os.makedirs(args.out, exist_ok=True)
            write_json(result, partial)
            log(f"parts so far in {partial}")

    result = run_suite(settings, log=log, checkpoint=checkpoint)
    if os.path.exists(partial):
        os.remove(partial)
    paths = write_report(result, args.out, args.json)
    print(markdown(result))
    log(f"wrote {paths['markdown']}, {paths['json']} and {len(paths['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
