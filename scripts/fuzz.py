#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""The long fuzz run: the targets of tests/test_fuzz.py with fresh random seeds, round after round, until the time
budget is spent. Prints the cases run per target and exits non-zero on the first failure (hypothesis prints the
shrunk failing example and a @reproduce_failure line to paste into the test).

    python scripts/fuzz.py --seconds 600 [--only quant_state,load_adapter] [--round-scale 5]

Under scripts/sanitize.sh (FUZZ_SECONDS=...) the same run happens inside the AddressSanitizer build.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300, help="time budget (default 300)")
    parser.add_argument("--only", default="", help="comma-separated substrings of target names")
    parser.add_argument("--round-scale", type=float, default=3.0,
                        help="examples per round, as a multiple of the CI counts (default 3)")  # fmt: skip
    args = parser.parse_args()
    os.environ["FOURBIT_FUZZ_RANDOM"] = "1"  # fresh seeds each round (CI is derandomized)
    os.environ["FOURBIT_FUZZ_SCALE"] = str(args.round_scale)
    sys.path.insert(0, str(TESTS))
    import pytest  # noqa: F401  (the fixtures below are plain functions under pytest's decorator)

    import test_fuzz as t

    fixtures = {}

    def fixture(name):
        if name not in fixtures:
            fixtures[name] = getattr(t, name).__wrapped__()
        return fixtures[name]

    targets = {
        "quantize": lambda: t.test_fuzz_quantize_matches_reference(),
        "corrupted_op": lambda: t.test_fuzz_ops_with_corrupted_arguments(),
        "quant_state": lambda: t.test_fuzz_quant_state_from_dict(),
        "linear4bit": lambda: t.test_fuzz_linear4bit_load_state_dict(),
        "load_adapter": lambda: t.test_fuzz_load_adapter(fixture("adapter_files")),
        "from_pretrained": lambda: t.test_fuzz_from_pretrained(fixture("checkpoint_files")),
    }
    if args.only:
        wanted = args.only.split(",")
        targets = {k: v for k, v in targets.items() if any(w in k for w in wanted)}
    start = time.monotonic()
    rounds = 0
    try:
        while time.monotonic() - start < args.seconds:
            for name, run in targets.items():
                if time.monotonic() - start >= args.seconds:
                    break
                run()
            rounds += 1
    except BaseException:
        print(f"FAILED after {time.monotonic() - start:.0f} s; cases run: {dict(t.COUNTS)}", flush=True)
        raise
    total = sum(t.COUNTS.values())
    print(f"cases per target: {dict(t.COUNTS)}")
    print(f"fuzz OK: {total} cases in {time.monotonic() - start:.0f} s ({rounds} rounds), no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
