"""``cycleqd-serve``: put chosen elites of a CycleQD run on vLLM engines and publish the serving manifest.

cycleqd-serve plan   [--config serve.yaml]   the selection and placement, without starting anything
cycleqd-serve run    [--config serve.yaml]   materialise, start and supervise the engines until SIGTERM/SIGINT
cycleqd-serve status [--config serve.yaml]   the manifest as a table
cycleqd-serve add ELITE / remove ELITE       change a running multi-LoRA deployment (admin key)
cycleqd-serve wait   [--config serve.yaml]   block until every engine in the manifest is ready (for scripts)
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from serve.config import ServeConfig

app = typer.Typer(help="Serve chosen elites of a CycleQD run on vLLM engines.", no_args_is_help=True)
console = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="serve config (YAML); default: every default")]
RunOpt = Annotated[Path | None, typer.Option("--run", help="run directory (overrides the config's `run`)")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="output directory (overrides the config's `out`)")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input (every ``cycleqd.errors.UserError``: a config, a run, a manifest, the engines) ends the command with
    its message and exit code 2; anything else keeps its traceback."""
    from rich.markup import escape

    from cycleqd.errors import UserError

    try:
        yield
    except UserError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")  # a message's [brackets] are text, not markup
        raise typer.Exit(2) from None


def load_config(path: Path | None, run: Path | None = None, out: Path | None = None, **more: object) -> ServeConfig:
    """The config file (or the defaults), with command-line overrides validated like the file's own settings."""
    from pydantic import ValidationError

    from cycleqd.configfile import ConfigError, load_yaml_model

    cfg = load_yaml_model(path, ServeConfig) if path else ServeConfig()
    updates = {k: v for k, v in (("run", run), ("out", out), *more.items()) if v is not None}
    if not updates:
        return cfg
    try:
        return ServeConfig.model_validate({**cfg.model_dump(), **updates})
    except ValidationError as exc:
        err0 = exc.errors()[0]
        raise ConfigError(f"--{str(err0['loc'][0]).replace('_', '-')}: {err0['msg']}") from exc


def _plan_table(prep) -> Table:
    title = f"placement ({prep.cfg.mode} mode)"
    if prep.plan.reason:  # mode: auto says what it chose and why
        title += f"\nmode auto -> {prep.plan.reason}"
    t = Table(title=title)
    for c in ("engine", "device", "url", "memory (GiB, est.)", "elites"):
        t.add_column(c)
    for e in prep.plan.engines:
        t.add_row(e.id, e.device.name, f"{prep.cfg.host}:{e.port}", f"{e.memory_gib:.2f}", ", ".join(e.elites))
    return t


def _selection_table(prep) -> Table:
    skills = prep.run_config.skills
    t = Table(title=f"{len(prep.selected)} elites selected from {prep.cfg.run}")
    t.add_column("elite")
    for s in skills:
        t.add_column(s, justify="right")
    t.add_column("selected by")
    for s in prep.selected:
        cells = [f"{100 * s.scores[k]:.1f}" if s.scores else "(scored at start)" for k in skills]
        t.add_row(s.id, *cells, ", ".join(s.selected_by))
    return t


@app.command()
def plan(config: ConfigOpt = None, run: RunOpt = None, out: OutOpt = None) -> None:
    """Print the selection and the placement plan; start nothing, write nothing."""
    from serve.service import prepare

    with user_errors():
        prep = prepare(load_config(config, run, out))
    console.print(_selection_table(prep))
    console.print(_plan_table(prep))


@app.command()
def materialise(config: ConfigOpt = None, run: RunOpt = None, out: OutOpt = None) -> None:
    """Write the selected elites' adapters (or full models) and print what each adapter's truncation costs."""
    from serve.materialise import materialise as write_all
    from serve.service import prepare

    with user_errors():
        prep = prepare(load_config(config, run, out))
        with console.status("materialising and scoring on validation"):
            arts = write_all(prep.cfg, prep.run_config, prep.bases, prep.selected)
    skills = prep.run_config.skills
    t = Table(title=f"{len(arts)} elites written under {prep.cfg.out} ({prep.cfg.mode})")
    for c in ("elite", "rank", "weight-space loss", *(f"{s}: archive -> served" for s in skills)):
        t.add_column(c)
    for a in arts:
        served = a.served_scores or a.scores
        cells = [
            f"{100 * a.scores[s]:.1f} -> {100 * served[s]:.1f} ({100 * (served[s] - a.scores[s]):+.1f})" for s in skills
        ]
        loss = f"{100 * a.truncation_error:.1f}%" if a.truncation_error is not None else "exact"
        t.add_row(a.selected.id, str(a.lora_rank or "full"), loss, *cells)
    console.print(t)


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    run: RunOpt = None,
    out: OutOpt = None,
    host: Annotated[str | None, typer.Option(help="engines bind here (overrides `host`)")] = None,
    advertise_host: Annotated[
        str | None, typer.Option(help="host in the manifest's URLs, e.g. this pod's IP (overrides `advertise_host`)")
    ] = None,
    admin_host: Annotated[str | None, typer.Option(help="the admin API binds here (overrides `admin_host`)")] = None,
) -> None:
    """Materialise the selected elites, start their vLLM engines, supervise them until SIGTERM or SIGINT."""
    from serve.admin import serve_admin
    from serve.service import build_supervisor, preflight, prepare

    stop = {"signal": None}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    with user_errors():
        cfg = load_config(config, run, out, host=host, advertise_host=advertise_host, admin_host=admin_host)
        prep = prepare(cfg)
        console.print(_plan_table(prep))
        preflight(prep)

        def done(art) -> None:
            if art.served_scores is not None and art.kind == "lora":
                delta = ", ".join(f"{k} {100 * (art.served_scores[k] - art.scores[k]):+.1f}" for k in art.scores)
                console.print(f"adapter {art.selected.id}: rank {art.lora_rank}; validation change: {delta}")
            else:
                console.print(f"materialised {art.selected.id} ({art.kind})")

        sup, _ = build_supervisor(prep, on_materialised=done)
        admin = None
        try:
            with console.status("starting engines"):
                times = sup.start(lambda e, t: console.print(f"{e.plan.id} ready at {e.url} after {t:.1f} s"))
            admin = serve_admin(sup)
            console.print(
                f"serving {len(sup.manifest.elites)} elites on {len(times)} engine(s); manifest: {sup.manifest_path}"
            )
            sup.run()
        except KeyboardInterrupt:
            pass
        finally:
            if admin is not None:
                admin.should_exit = True
            with console.status("stopping engines"):
                sup.shutdown()
            console.print("stopped every engine")


@app.command()
def status(config: ConfigOpt = None, out: OutOpt = None) -> None:
    """Print the serving manifest: engines with their health, elites with their scores."""
    from serve.manifest import load_manifest

    with user_errors():
        cfg = load_config(config, out=out)
        m = load_manifest(cfg.out / "manifest.json")
    t = Table(title=f"engines (manifest updated {time.strftime('%H:%M:%S', time.localtime(m.updated_at))})")
    for c in ("engine", "url", "device", "mode", "health", "restarts", "pid"):
        t.add_column(c)
    for e in m.engines:
        t.add_row(e.id, e.url, e.device, e.mode, e.health.value, str(e.restarts), str(e.pid))
    console.print(t)
    t = Table(title="elites")
    t.add_column("elite")
    t.add_column("engine")
    for s in m.skills:
        t.add_column(s, justify="right")
    for el in m.elites:
        sc = el.routing_scores()
        t.add_row(el.id, el.engine_id, *(f"{100 * sc[s]:.1f}" for s in m.skills))
    console.print(t)


def _admin(cfg: ServeConfig, method: str, path: str, **kw: object) -> dict:
    import httpx

    key = os.environ.get(cfg.admin_key_env, "")
    try:
        r = httpx.request(
            method,
            f"http://127.0.0.1:{cfg.admin_port}{path}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=300,
            **kw,
        )
    except httpx.ConnectError:
        err.print(
            f"[red]error:[/red] no cycleqd-serve admin API on 127.0.0.1:{cfg.admin_port}; is `cycleqd-serve run` up?"
        )
        raise typer.Exit(2) from None
    if r.status_code >= 400:
        err.print(f"[red]error:[/red] HTTP {r.status_code}: {r.json().get('detail', r.text)}")
        raise typer.Exit(2)
    return r.json()


@app.command()
def add(elite: Annotated[str, typer.Argument(help="elite id in the run")], config: ConfigOpt = None) -> None:
    """Load one more elite (as a LoRA adapter) into the running deployment, without restarting the others."""
    entry = _admin(load_config(config), "POST", "/elites", json={"id": elite})
    console.print(f"serving {entry['id']} at {entry['endpoint']} (engine {entry['engine_id']})")


@app.command()
def remove(elite: Annotated[str, typer.Argument(help="served elite id")], config: ConfigOpt = None) -> None:
    """Unload a served elite's adapter from its running engine."""
    _admin(load_config(config), "DELETE", f"/elites/{elite}")
    console.print(f"removed {elite}")


@app.command()
def wait(
    config: ConfigOpt = None,
    out: OutOpt = None,
    timeout: Annotated[
        float,
        typer.Option(
            help="seconds from now; started beside `run`, it also covers materialising and scoring the elites before "
            "any engine starts (minutes for a real model on a CPU)"
        ),
    ] = 300.0,
) -> None:
    """Wait until the manifest exists and every engine in it is ready (exit 1 on timeout)."""
    from serve.manifest import Health, ManifestError, load_manifest

    cfg = load_config(config, out=out)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            m = load_manifest(cfg.out / "manifest.json")
            if m.engines and all(e.health == Health.READY for e in m.engines):
                console.print(f"{len(m.engines)} engine(s) ready, {len(m.elites)} elites")
                return
        except ManifestError:
            pass
        time.sleep(1)
    err.print(f"[red]error:[/red] engines not ready after {timeout:.0f} s; see {cfg.out / 'logs'}")
    raise typer.Exit(1)


@app.command("route-demo")
def route_demo(
    url: Annotated[str, typer.Option(help="the router's OpenAI base URL")] = "http://127.0.0.1:8000/v1",
    per_skill: Annotated[
        int, typer.Option(min=1, help="held-out tasks per skill (fewer than 30: the scores are said to be rough)")
    ] = 100,
    seed: Annotated[int, typer.Option(help="which tasks, and their order")] = 0,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at once (an agent fleet's load)")] = 8,
    api_key: Annotated[str, typer.Option(envvar="CYCLEQD_API_KEY", help="router API key, if it needs one")] = "none",
    classifier_wait: Annotated[
        float, typer.Option(min=0, help="seconds to wait for a starting router's classifier (503 classifier_starting)")
    ] = 600,
) -> None:
    """Send a mixed batch of held-out skill-world tasks through a running router (model 'auto') and grade them
    (here, not in router/, which never imports evolve). Prints each skill's score with its 95% interval and how
    many decisions were ties (``x-cycleqd-tie``: the best elites' scores within the router's margin)."""
    import openai

    from evolve.evaluators import SKILL_NAMES, get_skill

    tasks = [(s, item) for s in SKILL_NAMES for item in get_skill(s).items("test", per_skill, seed=seed + 1000)]
    random.Random(seed).shuffle(tasks)
    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0)
    # Say once, not once per request in flight, that the classifier is starting: the first thread to take this
    # lock (never released) prints; a check-then-set of a flag could let two refused threads both print.
    told = threading.Lock()

    def ask(prompt: str):
        """One routed request; while the router is still embedding its classifier's exemplars (503
        ``classifier_starting``, a fresh router on a busy machine) wait as its Retry-After says, up to
        ``classifier_wait`` seconds in all."""
        deadline = time.monotonic() + classifier_wait
        while True:
            try:
                return client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0
                )
            except openai.APIStatusError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                code = body.get("code") or (body.get("error") or {}).get("code")
                if exc.status_code != 503 or code != "classifier_starting" or time.monotonic() > deadline:
                    raise
                if told.acquire(blocking=False):
                    err.print("the router's classifier is still starting (embedding its exemplars); waiting for it")
                time.sleep(min(max(float(exc.response.headers.get("retry-after") or 2), 0.5), 10.0))

    shown = 30  # rows printed; every task is graded and counted
    more = f"; the first {shown} shown" if len(tasks) > shown else ""
    table = Table(title=f"{len(tasks)} held-out tasks through {url} (model 'auto'{more})")
    for c in ("task", "skill", "elite", "reason", "tie", "weights", "score"):
        table.add_column(c)
    per_skill_scores: dict[str, list[float]] = {s: [] for s in SKILL_NAMES}
    ties = 0
    try:
        # Requests go out `concurrency` at a time (the engines batch them); rows and grades keep the task order.
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            answers = list(pool.map(lambda task: ask(task[1].prompt), tasks))
        for (skill, item), raw in zip(tasks, answers, strict=True):
            answer = raw.parse().choices[0].message.content or ""
            score = get_skill(skill).grade([item], [answer])[0]
            per_skill_scores[skill].append(score)
            h = raw.headers
            ties += "x-cycleqd-tie" in h
            if len(table.rows) >= shown:
                continue
            prompt = item.prompt if len(item.prompt) < 48 else item.prompt[:45] + "..."
            table.add_row(
                prompt, skill, h.get("x-cycleqd-elite", "?"), h.get("x-cycleqd-reason", "?"),
                h.get("x-cycleqd-tie", ""), h.get("x-cycleqd-skill-weights", "?"), f"{score:.0f}",
            )  # fmt: skip
    except openai.APIError as exc:
        err.print(f"[red]error:[/red] the router answered {exc}")
        raise typer.Exit(1) from None
    console.print(table)

    def half_width(v: list[float]) -> float:  # 95% interval of a mean score (normal approximation)
        mean = sum(v) / len(v)
        return 196 * (sum((x - mean) ** 2 for x in v) / max(len(v) - 1, 1) / len(v)) ** 0.5

    summary = ", ".join(f"{s} {100 * sum(v) / len(v):.1f}% ± {half_width(v):.1f}" for s, v in per_skill_scores.items())
    console.print(f"score per skill: {summary} (95% intervals, {per_skill} tasks per skill)")
    console.print(
        f"ties: {ties} of {len(tasks)} decisions (x-cycleqd-tie: the best elites' scores were within the router's "
        "margin, so load or the session chose among them)"
    )
    if per_skill < 30:
        console.print(
            f"[yellow]only {per_skill} tasks per skill: these scores say little (one task moves a skill by "
            f"{100 / per_skill:.0f} points) and compare no elites; use --per-skill 100 for a number that means "
            "something[/yellow]"
        )


@app.command("route-episodes")
def route_episodes(
    config: Annotated[
        Path, typer.Option(help="the run config whose skills: are routed (e.g. configs/agentbench-evolve.yaml)")
    ],
    url: Annotated[str, typer.Option(help="the router's OpenAI base URL")] = "http://127.0.0.1:8000/v1",
    manifest: Annotated[
        Path | None, typer.Option(help="the serving manifest, for the oracle (best served elite per skill on test)")
    ] = None,
    skill: Annotated[
        list[str] | None, typer.Option(help="skill to route (repeatable); default: all configured")
    ] = None,
    per_skill: Annotated[int, typer.Option(min=1, help="held-out test episodes per skill")] = 1000,
    seed: Annotated[int, typer.Option(help="which episodes when fewer than the split")] = 0,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at once (an agent fleet's load)")] = 8,
    api_key: Annotated[str, typer.Option(envvar="CYCLEQD_API_KEY", help="router API key, if it needs one")] = "none",
    out: Annotated[Path | None, typer.Option(help="JSON of every routed episode: elites per turn, transcript")] = None,
    classifier_wait: Annotated[
        float, typer.Option(min=0, help="seconds to wait for a starting router's classifier (503 classifier_starting)")
    ] = 600,
) -> None:
    """Run held-out benchmark episodes through a running router as an agent would (model 'auto', the whole
    conversation each turn), execute the returned actions here, grade them, and count episodes whose turns went
    to more than one elite."""
    import json

    import openai

    from evolve.evaluators import EpisodeTask
    from evolve.export import config_skills
    from serve.manifest import load_manifest
    from serve.route_episodes import asker, oracle, route_skill

    with user_errors():
        tasks = config_skills(config, skill)
        for t in tasks:
            if not isinstance(t, EpisodeTask):
                raise typer.BadParameter(f"skill {t.name!r} is not an episode skill", param_hint="--skill")
        served = load_manifest(manifest) if manifest else None
    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0)
    ask = asker(client, classifier_wait=classifier_wait, notice=err.print)
    routed = []
    try:
        for task in tasks:
            items = task.episode_items("test", per_skill, seed=seed)  # type: ignore[union-attr]
            with console.status(f"routing {len(items)} {task.name} episodes"):
                routed.append(route_skill(task, items, ask, concurrency))  # type: ignore[arg-type]
    except openai.APIError as exc:
        err.print(f"[red]error:[/red] the router answered {exc}")
        raise typer.Exit(1) from None
    best = oracle(served, [r.skill for r in routed]) if served else {}
    table = Table(title=f"held-out test episodes through {url} (model 'auto')")
    for c in ("skill", "episodes", "routed", "oracle", "routed/oracle", "split across elites", "elites used"):
        table.add_column(c, justify="right" if c != "skill" else "left")
    for r in routed:
        o = best.get(r.skill)
        ratio = f"{100 * r.score / o:.1f}%" if o else "-"
        used = sorted({e for turns in r.elites for e in turns})
        table.add_row(
            r.skill, str(len(r.transcripts)), f"{100 * r.score:.1f}", "-" if o is None else f"{100 * o:.1f}",
            ratio, str(r.split), ", ".join(used),
        )  # fmt: skip
    console.print(table)
    mean = sum(r.score for r in routed) / len(routed)
    known = [best[r.skill] for r in routed if best.get(r.skill) is not None]
    line = f"routed mean {100 * mean:.1f}; episodes split across elites: {sum(r.split for r in routed)}"
    if len(known) == len(routed) and known:
        omean = sum(known) / len(known)  # type: ignore[arg-type]
        line += f"; oracle mean {100 * omean:.1f}; routed/oracle {100 * mean / omean:.1f}%" if omean else ""
    console.print(line)
    if out is not None:
        from cycleqd.atomic import write_text_atomic

        rows = [
            {"skill": r.skill, "elites": e, "reasons": why, **t.to_json()}
            for r in routed
            for t, e, why in zip(r.transcripts, r.elites, r.reasons, strict=True)
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        console.print(f"routed episodes: {out} ({json.dumps({r.skill: r.split for r in routed})} split)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
