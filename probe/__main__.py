"""``python -m probe predict|fit --config ...`` (LightningCLI) and ``python -m probe analyze RUN_DIR``."""

import sys

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "analyze":  # not a LightningCLI subcommand: dispatch before it parses
        from probe.analyze import main as analyze

        sys.exit(analyze(sys.argv[2:]))
    from probe.cli import main

    main()
