"""Sweep runner: run a kit script over a grid of flags and seeds, resume after an interruption, and
aggregate the points' results.json into a table and a figure.

Commands
    python sweep.py star_in_weights.py --grid degree=100,200 --grid lr=1e-3,3e-3 --seeds 0,1,2 \
        --set hardest_token=true --set layers=4 --set width=128 --set heads=4 --set steps=4000 \
        --out runs/sweep/degree_lr --jobs 2 --metric test_first_token --reach 'test_first_token>=0.9'
    python sweep.py star_in_weights.py --grid degree=100,200 --out runs/sweep/x --dry-run  # commands only
    python sweep.py --aggregate runs/sweep/degree_lr                           # redo table and figure
    python sweep.py --aggregate runs/sweep/degree_lr --metric peak_test_first_token   # another metric

--grid may repeat (cartesian product; values cannot contain commas); --set goes to every point;
NAME=true/false becomes --name / --no-name; names take _ or -; a whole number in scientific notation
(steps=1e3) is passed as an integer (--steps 1000), which int flags accept. --metric is a dotted path
in the metrics (or verdict.value, the default, or verdict.reproduced); --reach 'KEY>=V' (may repeat;
quote it, > is a shell redirection) asks for the first history step with KEY >= V. It needs a history
whose steps increase: star_in_context.py, tree_star.py, freeze_embeddings.py and tiny_graphs.py put
several modes, splits, arms or runs into one history (the step count restarts), so for such a point
the reach is left empty, with a note in summary.md, rather than taken from whichever got there first.

Before anything is written or run, every point's flags are parsed and validated by the script's own
CLI (common.cli, in one subprocess that imports the script but runs nothing): a bad flag or value is
a one-line error naming the point, exit status 2. Scripts not built on common.cli are not checked.
--out must be a folder (or not exist yet), not a file or below one.

Writes into --out: points/<key>/ per point (e.g. degree=200__lr=0.001__seed=0: the script's --out,
plus log.txt), sweep.json (the spec, so `--aggregate OUT` alone redoes the summary), summary.csv
(one row per point and seed), summary.md (grouped over seeds: n, mean, std (n-1), min, max, runs
reproduced out of those that finished, with the missing ones counted apart, median reach step) and
summary.png (mean metric, or with --reach the median reach step on log-log axes, against --x, one
line per combination of the other swept flags, bars over the seeds' min..max).
A point is finished iff its results.json exists and parses, so rerunning the same command skips
finished points. A failed point does not stop the others; the sweep then exits 1.

Running one point (point_command, run_point) is kept apart from scheduling the points (run_local, a
thread pool of subprocesses), so a cluster engine (submitit/SLURM, Ray) can replace run_local alone.
On CPU each point gets OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1; with CUDA devices visible each
running point owns one GPU via CUDA_VISIBLE_DEVICES (--jobs is capped at the GPU count);
`--set device=cpu` keeps the CPU mode.
"""
from __future__ import annotations

import argparse
import csv
import decimal
import io
import itertools
import json
import os
import queue
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

RESERVED = {"seed", "out"}  # the sweep sets these itself


class BadInput(Exception):
    """Bad command-line input: one line on stderr, exit status 2, nothing run."""


# ---------------------------------------------------------------------------------- parsing
def flag_name(name: str) -> str:
    name = name.strip().replace("_", "-")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
        raise BadInput(f"bad flag name {name!r}")
    return name


SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_value(text: str):
    """'true'/'false' -> bool, then int, then float, else the string. A whole number in scientific
    notation (1e3, 2.5e3) is an int: as a float it would reach the command as 1000.0, which int flags reject."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if SCIENTIFIC.fullmatch(text):
        exact = decimal.Decimal(text)
        if exact.adjusted() < 19 and exact == exact.to_integral_value():  # adjusted: no 1e999999 digit strings
            return int(exact)
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)  # repr: 0.001 round-trips exactly


def parse_assignment(text: str, many: bool) -> tuple[str, list]:
    """'lr=1e-3,3e-3' -> ('lr', [0.001, 0.003]) with many, 'layers=4' -> ('layers', [4]) without."""
    name, eq, rest = text.partition("=")
    items = rest.split(",") if many else [rest]
    if not eq or any(not item.strip() for item in items):
        raise BadInput(f"expected NAME={'V1,V2,...' if many else 'VALUE'}, got {text!r}")
    values = [parse_value(item) for item in items]
    if len({format_value(v) for v in values}) < len(values):
        raise BadInput(f"repeated value in {text!r}")
    return flag_name(name), values


def parse_reach(text: str) -> tuple[str, float]:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*(\S+)\s*", text)
    try:
        return m.group(1), float(m.group(2))
    except (AttributeError, ValueError):
        raise BadInput(f"--reach expects KEY>=NUMBER, got {text!r}") from None


def out_problem(out: str) -> str | None:
    """Why `out` cannot be a folder to write into (a file, or below one; not writable), else None."""
    path = os.path.abspath(out)
    while not os.path.isdir(path):  # walk up to the first part that exists
        if os.path.exists(path):
            return f"--out {out}: {path} is an existing file, not a folder"
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.access(path, os.W_OK) else f"--out {out}: {path} is not writable"


# Run in a subprocess (the script imports torch; importing runs nothing, its main is behind __main__):
# common.cli parses and validates each point's argv and exits 2 on the first bad one.
FLAG_CHECK = r"""
import contextlib, importlib.util, io, json, os, sys
script = sys.argv[1]
sys.argv[0] = script  # argparse names the script in its messages
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
spec = importlib.util.spec_from_file_location("swept_script", script)
mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # registered: dataclasses look it up
with contextlib.redirect_stdout(sys.stderr):
    spec.loader.exec_module(mod)
import common as C
for key, argv in json.load(sys.stdin):
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            C.cli(mod.Config, "", mod.QUICK, getattr(mod, "validate", None), argv=argv,
                  small=getattr(mod, "SMALL", None))
    except SystemExit:
        print(json.dumps([key, (said.getvalue().strip().splitlines() or ["refused"])[-1]]))
        break
"""


def uses_common_cli(script: str) -> bool:
    """A kit script: flags from common.cli, main behind `if __name__ == "__main__"` (so importing it runs nothing)."""
    try:
        with open(script) as fh:
            source = fh.read()
    except OSError:
        return False
    return "C.cli(Config" in source and re.search(r"""if __name__ == ["']__main__["']""", source) is not None


def check_flags(script: str, points: list[dict]) -> None:
    """Raise BadInput naming the first point whose flags the script's own CLI refuses, before anything runs;
    otherwise a typo in --set would fail every point only after the sweep folder was written."""
    if not points or not uses_common_cli(script):
        return
    argvs = [[p["key"], p["cmd"][2:]] for p in points]  # cmd = [python, script, *flags]
    proc = subprocess.run([sys.executable, "-c", FLAG_CHECK, script], input=json.dumps(argvs), capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    name = os.path.basename(script)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise BadInput(f"could not check the flags with {name} (exit {proc.returncode}): {last}")
    if proc.stdout.strip():
        key, message = json.loads(proc.stdout.strip().splitlines()[-1])
        raise BadInput(f"{name} refuses the flags of point {key}: {message.partition('error: ')[2] or message}")


# ---------------------------------------------------------------------------------- points
def point_key(swept: dict, seed: int) -> str:
    """Stable, readable folder name: swept flags sorted by name, then the seed."""
    parts = [f"{k}={format_value(v)}" for k, v in sorted(swept.items())] + [f"seed={seed}"]
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "__".join(parts))


def point_command(script: str, flags: dict, seed: int, out_dir: str) -> list[str]:
    cmd = [sys.executable, script]
    for name, value in flags.items():
        if isinstance(value, bool):  # the kit's bools are --flag / --no-flag
            cmd.append(f"--{name}" if value else f"--no-{name}")
        else:
            cmd += [f"--{name}", format_value(value)]
    return cmd + ["--seed", str(seed), "--out", out_dir]


def make_points(spec: dict, out: str) -> list[dict]:
    """Every (grid combination, seed) of the spec, seeds innermost."""
    points = []
    for values in itertools.product(*spec["grid"].values()):
        swept = dict(zip(spec["grid"], values))
        for seed in spec["seeds"]:
            folder = os.path.join(out, "points", point_key(swept, seed))
            points.append(dict(key=point_key(swept, seed), swept=swept, seed=seed, out=folder,
                               cmd=point_command(spec["script"], {**spec["set"], **swept}, seed, folder)))
    return points


def read_json(path: str) -> dict | None:
    """The JSON object in path, or None if it is missing or does not parse."""
    try:
        with open(path) as fh:
            obj = json.load(fh)
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def load_results(folder: str) -> dict | None:
    return read_json(os.path.join(folder, "results.json"))  # None = the point is not finished


# ---------------------------------------------------------------------------------- running
def run_point(cmd: list[str], out_dir: str, env: dict) -> int:
    """Run one point as a subprocess, stdout and stderr to out_dir/log.txt; returns its exit status."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "log.txt"), "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def visible_gpus() -> list[str]:
    """CUDA device ids to hand out: CUDA_VISIBLE_DEVICES if set, else torch's count, else none."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() not in ("", "-1")]
    try:
        import torch  # only to count devices; imported late since the CPU path does not need it
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def run_local(points: list[dict], jobs: int, devices: list[str]) -> dict[str, int]:
    """Local scheduler: up to `jobs` points at once, each owning one of `devices` (GPU ids) if any.
    Returns {point key: exit status}."""
    base = dict(os.environ)
    if devices:
        jobs = min(jobs, len(devices))  # at most one point per GPU
    else:
        base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # n single-thread jobs, no oversubscription
    free = queue.Queue()
    for d in devices:
        free.put(d)

    def work(p):
        env, gpu = dict(base), free.get() if devices else None  # a GPU is held only while its point runs
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        try:
            return run_point(p["cmd"], p["out"], env)
        finally:
            if gpu is not None:
                free.put(gpu)

    codes, start = {}, time.time()
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(work, p): p for p in points}
        for future in as_completed(futures):
            key = futures[future]["key"]
            codes[key] = future.result()
            print(f"[sweep] {len(codes)}/{len(points)} {key}: {'ok' if codes[key] == 0 else 'FAILED'} "
                  f"({time.time() - start:.0f} s since the sweep began)", flush=True)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)  # start nothing new; running children got the Ctrl-C
        raise
    pool.shutdown()
    return codes


# ---------------------------------------------------------------------------------- aggregation
def atomic_write(path: str, write) -> None:
    """write(tmp) then os.replace(tmp, path): a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp_")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    atomic_write(path, write)


def lookup(obj, path: str):
    """obj['a']['b'] for path 'a.b'; None if a part is missing."""
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def metric_value(res: dict, path: str) -> float | None:
    """In res['metrics'] first, then at the top level (verdict.value, verdict.reproduced, seconds)."""
    value = lookup(res.get("metrics", {}), path)
    value = lookup(res, path) if value is None else value
    return float(value) if isinstance(value, (int, float)) else None  # bools count as 0/1


def steps_restart(history: list) -> bool:
    """True if the steps do not increase: several modes, splits, arms or runs in one history (star_in_context.py,
    tree_star.py, freeze_embeddings.py, tiny_graphs.py), each counting from step 0 again."""
    steps = [h["step"] for h in history if isinstance(h, dict) and isinstance(h.get("step"), (int, float))]
    return any(b <= a for a, b in zip(steps, steps[1:]))


def first_reach(history: list, key: str, threshold: float) -> tuple:
    """(step, epoch) of the first history record with record[key] >= threshold, else (None, None).
    ValueError if the steps restart: the first record to get there may belong to another mode than the one meant."""
    if steps_restart(history):
        raise ValueError("its history's steps restart (several modes, splits or arms in one run)")
    for h in history:
        v = lookup(h, key)
        if isinstance(v, (int, float)) and v >= threshold:
            return h.get("step"), h.get("epoch")
    return None, None


def collect(spec: dict, out: str, ambiguous: list | None = None) -> list[dict]:
    """One row per point: swept flags, seed, status, metric, reproduced, seconds, reach step/epoch. The reach of a
    point whose history restarts its steps is left empty and its key appended to `ambiguous`."""
    rows = []
    for p in make_points(spec, out):
        res = load_results(p["out"])
        row = {**p["swept"], "seed": p["seed"], "status": "done" if res else "missing"}
        res = res or {}
        row.update(metric=metric_value(res, spec["metric"]), reproduced=lookup(res, "verdict.reproduced"),
                   seconds=res.get("seconds"))
        for reach in spec["reach"]:
            try:
                row[f"{reach} step"], row[f"{reach} epoch"] = first_reach(res.get("history") or [], *parse_reach(reach))
            except ValueError:
                row[f"{reach} step"] = row[f"{reach} epoch"] = None
                if ambiguous is not None and p["key"] not in ambiguous:
                    ambiguous.append(p["key"])
        rows.append(row)
    return rows


def group(spec: dict, rows: list[dict]) -> list[dict]:
    """Rows grouped over seeds: n, mean, std (n-1), min, max of the metric; runs (all points) and done (those
    with a results.json: the denominator of 'reproduced' and of the reach counts, so that a failed point is not
    read as a run that did not reproduce); mean seconds; per --reach the steps of the seeds that reached, their
    median and count."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in spec["grid"]), []).append(row)
    table = []
    for values, members in groups.items():
        vals = [r["metric"] for r in members if r["metric"] is not None]
        secs = [r["seconds"] for r in members if r["seconds"] is not None]
        g = dict(zip(spec["grid"], values), n=len(vals), runs=len(members),
                 done=sum(r.get("status") != "missing" for r in members),
                 mean=statistics.fmean(vals) if vals else None, std=statistics.stdev(vals) if len(vals) > 1 else None,
                 min=min(vals, default=None), max=max(vals, default=None),
                 reproduced=sum(r["reproduced"] is True for r in members),
                 seconds=statistics.fmean(secs) if secs else None)
        for reach in spec["reach"]:
            steps = [r[f"{reach} step"] for r in members if r[f"{reach} step"] is not None]
            g[f"{reach} steps"], g[f"{reach} median"] = steps, statistics.median(steps) if steps else None
        table.append(g)
    return table


def fmt(x) -> str:
    return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def markdown(spec: dict, table: list[dict], ambiguous: list = ()) -> str:
    head = list(spec["grid"]) + ["n", f"{spec['metric']} mean", "std", "min", "max", "reproduced", "seconds"]
    head += [f"{reach}: median step (reached)" for reach in spec["reach"]]
    lines = [f"# Sweep of {os.path.basename(spec['script'])}, seeds {spec['seeds']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in table:
        cells = [format_value(g[k]) for k in spec["grid"]] + [str(g["n"])]
        cells += [fmt(g[k]) for k in ("mean", "std", "min", "max")]
        missing = f" ({g['runs'] - g['done']} missing)" if g["done"] < g["runs"] else ""
        cells += [f"{g['reproduced']}/{g['done']}{missing}", fmt(g["seconds"])]
        cells += [f"{fmt(g[f'{r} median'])} ({len(g[f'{r} steps'])}/{g['done']})" for r in spec["reach"]]
        lines.append("| " + " | ".join(cells) + " |")
    fixed = ", ".join(f"{k}={format_value(v)}" for k, v in spec["set"].items())
    lines += ["", f"Fixed flags: {fixed or 'none'}."]
    if ambiguous:
        lines += ["", f"--reach left empty for {len(ambiguous)} point(s) whose history restarts its steps (several "
                  "modes, splits or arms in one run, so the first step reaching a level is ambiguous): "
                  f"{', '.join(ambiguous)}."]
    return "\n".join(lines) + "\n"


def plot(spec: dict, table: list[dict], path: str) -> None:
    import matplotlib  # late import: running points and --dry-run do not need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, others = spec["x"], [k for k in spec["grid"] if k != spec["x"]]
    xs = list(dict.fromkeys(g[x] for g in table)) if x else [None]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    xs = sorted(xs, key=None if numeric else format_value)
    # one panel per --reach (median step, bars over the seeds that reached), else the metric's mean
    panels = [(f"{r} median", f"{r} steps", f"first step with {r}") for r in spec["reach"]]
    panels = panels or [("mean", None, spec["metric"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, (ykey, spread, label) in zip(axes[0], panels):
        lines, lows, drawn = {}, [], 0
        for g in table:
            lines.setdefault(", ".join(f"{k}={format_value(g[k])}" for k in others) or "all", []).append(g)
        for name, members in lines.items():
            pts = sorted((g[x] if numeric else xs.index(g.get(x)), g[ykey],
                          *((min(g[spread]), max(g[spread])) if spread else (g["min"], g["max"])))
                         for g in members if g[ykey] is not None)
            if pts:
                pos, y, lo, hi = zip(*pts)
                yerr = [[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]]
                ax.errorbar(pos, y, yerr=yerr, marker="o", capsize=3, label=name)
                lows, drawn = lows + list(lo), drawn + 1
        if spread and numeric and min(xs) > 0:
            ax.set_xscale("log")
        if spread and lows and min(lows) > 0:  # a reach at step 0 cannot go on a log axis
            ax.set_yscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs)), [format_value(v) if x else "all" for v in xs])
        ax.set(xlabel=x or "", ylabel=label)
        ax.grid(alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(spec['script'])}, seeds {spec['seeds']}", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)


def aggregate(spec: dict, out: str) -> list[dict]:
    """Write OUT/summary.csv, summary.md and summary.png from the points of `spec` found in OUT."""
    ambiguous = []
    rows = collect(spec, out, ambiguous)
    done = [r for r in rows if r["status"] == "done"]
    if done and all(r["metric"] is None for r in done):  # likely a typo in --metric: say what exists
        res = next(filter(None, (load_results(p["out"]) for p in make_points(spec, out))))
        print(f"[sweep] metric {spec['metric']!r} not found; metrics has: {', '.join(res.get('metrics', {}))}",
              file=sys.stderr)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else format_value(v) for k, v in r.items()} for r in rows)
    write_text(os.path.join(out, "summary.csv"), buf.getvalue())
    table = group(spec, rows)
    write_text(os.path.join(out, "summary.md"), markdown(spec, table, ambiguous))
    if ambiguous:
        print(f"[sweep] --reach left empty for {len(ambiguous)} point(s): their history restarts its steps "
              "(several modes, splits or arms in one run); see summary.md", file=sys.stderr)
    plot(spec, table, os.path.join(out, "summary.png"))
    print(f"[sweep] {len(done)}/{len(rows)} points done; wrote summary.csv, summary.md, summary.png in {out}")
    return table


# ---------------------------------------------------------------------------------- main
def build_spec(args) -> dict:
    if not os.path.isfile(args.script):
        raise BadInput(f"no such script file: {args.script}")
    grid, fixed = {}, {}
    for text in args.grid:
        name, values = parse_assignment(text, many=True)
        if name in grid or name in RESERVED:
            raise BadInput(f"--grid {name}: given twice, or set by the sweep itself (--seeds, --out)")
        grid[name] = values
    for text in args.set:
        name, (value,) = parse_assignment(text, many=False)
        if name in grid or name in fixed or name in RESERVED:
            raise BadInput(f"--set {name}: given twice, swept by --grid, or set by the sweep itself")
        fixed[name] = value
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) < len(seeds):
        raise BadInput(f"--seeds expects distinct comma-separated integers, got {args.seeds!r}")
    if args.jobs < 1:
        raise BadInput(f"--jobs must be >= 1, got {args.jobs}")
    spec = dict(script=args.script, grid=grid, set=fixed, seeds=seeds, metric="verdict.value", reach=[], x=None)
    return apply_aggregation_flags(spec, args)


def apply_aggregation_flags(spec: dict, args) -> dict:
    """--metric, --reach and --x: checked, and override what the spec had."""
    spec["metric"] = args.metric or spec["metric"]
    spec["reach"] = [r.replace(" ", "") for r in args.reach] if args.reach else spec["reach"]
    for r in spec["reach"]:
        parse_reach(r)
    spec["x"] = flag_name(args.x) if args.x else spec["x"] or next(iter(spec["grid"]), None)
    if spec["x"] is not None and spec["x"] not in spec["grid"]:
        raise BadInput(f"--x {spec['x']} is not a --grid flag ({', '.join(spec['grid']) or 'none'})")
    return spec


def any_finished(out: str) -> bool:
    """Whether a point folder under out/points holds a results.json that parses."""
    points = os.path.join(out, "points")
    return os.path.isdir(points) and any(load_results(os.path.join(points, k)) for k in os.listdir(points))


def fail(message: str):
    print(f"sweep.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n")[:2]), allow_abbrev=False)
    p.error = fail  # one line, exit status 2, no usage dump
    p.add_argument("script", nargs="?", help="experiment script, e.g. star_in_weights.py")
    p.add_argument("--grid", action="append", default=[], help="NAME=V1,V2,... swept (repeatable)")
    p.add_argument("--set", action="append", default=[], help="NAME=VALUE passed to every point (repeatable)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--out", help="sweep folder, e.g. runs/sweep/NAME")
    p.add_argument("--jobs", type=int, default=1, help="points at once (at most one per GPU)")
    p.add_argument("--x", help="flag on the figure's x axis (default: the first --grid flag)")
    p.add_argument("--metric", help="dotted path in metrics, or verdict.value (default) / verdict.reproduced")
    p.add_argument("--reach", action="append", help="KEY>=V: first history step reaching it (repeatable; left empty "
                   "where a history restarts its steps: several modes, splits or arms in one run)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--aggregate", metavar="OUT", help="only redo the summary of an existing sweep folder")
    args = p.parse_args(argv)
    try:
        if args.aggregate:
            spec = read_json(os.path.join(args.aggregate, "sweep.json"))
            if spec is None:
                raise BadInput(f"no readable sweep.json in {args.aggregate}")
            aggregate(apply_aggregation_flags(spec, args), args.aggregate)
            return 0
        if not args.script or not args.out:
            raise BadInput("give SCRIPT and --out (or --aggregate OUT)")
        problem = out_problem(args.out)
        if problem:
            raise BadInput(problem)
        spec = build_spec(args)
        points = make_points(spec, args.out)
        todo = [pt for pt in points if load_results(pt["out"]) is None]
        # reused points must be of the same experiment; a folder with no finished point has none to mix up
        old = read_json(os.path.join(args.out, "sweep.json"))
        if (old and (os.path.basename(old.get("script", "")) != os.path.basename(spec["script"])
                     or old.get("set") != spec["set"]) and any_finished(args.out)):
            raise BadInput(f"{args.out} holds a sweep with another script or other --set flags; use a new --out")
        check_flags(spec["script"], todo)
    except BadInput as e:
        fail(str(e))

    print(f"[sweep] {len(points)} points: {len(points) - len(todo)} finished (skipped), {len(todo)} to run")
    if args.dry_run:
        print("\n".join(shlex.join(pt["cmd"]) for pt in todo))
        return 0
    os.makedirs(args.out, exist_ok=True)
    write_text(os.path.join(args.out, "sweep.json"), json.dumps(spec, indent=1) + "\n")  # first: resumable
    devices = [] if spec["set"].get("device") == "cpu" else visible_gpus()
    print(f"[sweep] {'GPUs ' + ','.join(devices) if devices else 'CPU, one thread per point'}, --jobs {args.jobs}")
    try:
        codes = run_local(todo, args.jobs, devices)
    except KeyboardInterrupt:
        print("[sweep] interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    failed = [pt for pt in todo if codes.get(pt["key"]) != 0]
    for pt in failed:
        with open(os.path.join(pt["out"], "log.txt")) as fh:
            tail = "".join(fh.readlines()[-15:])
        print(f"[sweep] FAILED {pt['key']} (exit {codes.get(pt['key'])}); end of its log.txt:\n{tail}", file=sys.stderr)
    aggregate(spec, args.out)
    if failed:
        print(f"[sweep] {len(failed)} of {len(todo)} points failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
