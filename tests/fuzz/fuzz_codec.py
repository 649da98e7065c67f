"""A longer fuzz run of the codec and the server's message handler (not run by pytest or CI).

Runs the properties of ``tests/unit/test_wire_properties.py`` with many more examples, and
prints one JSON line with the examples tried per property. Exits 1 on the first failure, printed
with hypothesis's smallest failing input.

    python tests/fuzz/fuzz_codec.py [--examples 20000] [--seed N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from hypothesis import seed

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

NAMES = [
    "test_we_read_what_protobuf_writes",
    "test_protobuf_reads_back_what_we_write_in_messages_of_any_size",
    "test_any_mutation_is_read_or_refused_with_value_error",
    "test_the_handler_answers_or_refuses_cleanly_and_a_refusal_changes_nothing",
]


def main() -> int:
    """Run every property with ``--examples`` examples; 0 if all hold."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=None, help="for a reproducible run")
    args = parser.parse_args()
    os.environ["PARAMSERVER_FUZZ_EXAMPLES"] = str(args.examples)  # read at import
    properties = importlib.import_module("tests.unit.test_wire_properties")
    report: dict = {"examples": args.examples, "seed": args.seed, "properties": {}}
    for name in NAMES:
        run = getattr(properties, name)
        if args.seed is not None:
            run = seed(args.seed)(run)
        start = time.monotonic()
        try:
            run()
        except Exception:  # the traceback's notes hold hypothesis's smallest failing input
            traceback.print_exc()
            report["properties"][name] = "FAILED"
            print(json.dumps(report))
            return 1
        report["properties"][name] = {"seconds": round(time.monotonic() - start, 1)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
