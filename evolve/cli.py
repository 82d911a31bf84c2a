"""``cycleqd-evolve``: the offline side of the system (bootstrap the embedded default; CycleQD runs come next)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Evolve a population of skill-specialised LLM elites with CycleQD.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Evolve a population of skill-specialised LLM elites with CycleQD."""


@app.command()
def bootstrap(
    out: Annotated[Path, typer.Option(help="output directory for the models and bootstrap.json")] = Path(
        ".cache/demo/models"
    ),
    config: Annotated[
        Path | None, typer.Option(help="YAML file overriding the defaults (see evolve/config.py BootstrapConfig)")
    ] = None,
    force: Annotated[bool, typer.Option(help="retrain models even when a matching one is saved")] = False,
) -> None:
    """Train the embedded default's base model, one expert per skill and the multi-task baseline on the CPU,
    then print their test accuracy with the plain average merges of the experts."""
    from evolve.bootstrap import BootstrapError, run_bootstrap
    from evolve.config import BootstrapConfig, ConfigError, load_yaml_model
    from evolve.models.modeling import ModelError

    try:
        cfg = load_yaml_model(config, BootstrapConfig) if config else BootstrapConfig()
        run_bootstrap(cfg, out, force=force, console=console)
    except (ConfigError, BootstrapError, ModelError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
