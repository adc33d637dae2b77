"""``python -m probe predict|fit --config ...`` (LightningCLI) and ``python -m probe analyze RUN_DIR``
(dispatched by :func:`probe.cli.main` before LightningCLI parses)."""

if __name__ == "__main__":
    from probe.cli import main

    main()
