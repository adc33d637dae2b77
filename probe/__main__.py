"""``python -m probe predict --config configs/toy.yaml`` (LightningCLI)."""
from probe.cli import main

if __name__ == "__main__":
    main()
