"""rapnet-sim: not implemented yet (issue 7)."""
import sys


def main() -> None:
    sys.exit("rapnet-sim: not implemented yet (see issue 7)")
