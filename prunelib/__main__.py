"""`python -m prunelib ...` runs the command-line interface (`prunelib.cli.main`)."""
from prunelib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
