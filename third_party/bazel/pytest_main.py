"""Entry point for py_test targets: runs one pytest file and exits with its code.

Usage (set up by //:BUILD): pytest_main.py <test file> [extra pytest args...]
"""

import os
import sys

import pytest


def main(argv):
    args = list(argv) + ["-q", "-p", "no:cacheprovider"]
    # Let Bazel pick up per-test-case results (bazel-testlogs/.../test.xml).
    xml_output = os.environ.get("XML_OUTPUT_FILE")
    if xml_output:
        args.append("--junitxml=" + xml_output)
    # Support `bazel test --test_filter=<pytest -k expression>`.
    test_filter = os.environ.get("TESTBRIDGE_TEST_ONLY")
    if test_filter:
        args += ["-k", test_filter]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
