"""The tally both report tests keep: check() stops at the first failure with its message, and
summary() prints the plain closing line ctest's log and CI read ("N passed, 0 failed")."""
import sys

passed = 0


def check(cond, what):
    global passed
    if not cond:
        print("FAIL:", what)
        print("%d passed, 1 failed" % passed)
        sys.exit(1)
    passed += 1


def summary():
    print("%d passed, 0 failed" % passed)
