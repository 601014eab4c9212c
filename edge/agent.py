"""edge-agent: not implemented yet (issue 6)."""
import sys


def main() -> None:
    sys.exit("edge-agent: not implemented yet (see issue 6); use rapnet-eval to evaluate the shipped model")
