"""The recipe study (issue 9): how many steps (and epochs) the in-weights path-star takes to
generalize, as a function of the degree d, under the present default and the embedding-LR recipe.

Question. With the token embedding (tied to the head) in its own AdamW group at `--embed-lr-mult`
times the body's LR, how do the steps to 50% / 90% held-out first-token accuracy on G(d,5) grow
with d, and does the old default (multiplier 1, weight decay 0.01) get there at all within the cap?

Commands
    python recipe_study.py --run                 # run the sweeps (resumes; ~1 h on one CPU core)
    python recipe_study.py                       # aggregate: table, fit and figure into --out
    python recipe_study.py --levers              # the paper's 12x384: the levers' table and curves
Each sweep is a plain `sweep.py` call (printed before it runs), so any one can be rerun or extended
by hand. Proxy model: GPT 4x128, 4 heads, batch 256, warmup 300, eval every 250 steps, cap 4,000
steps, stop at 90% held out (`--stop-at 0.9`), CPU with one thread per point.

Outputs in --out (default results/recipe_study/, on purpose: it regenerates the committed, curated study;
give another --out to keep that one as it is): study.md (the table and the fits), study.csv (one
row per run), steps_to_90.png (steps and epochs to 90% against d, log-log, median and min..max over
seeds, one line per recipe, with the fitted power law).

--levers reads the paper's GPT 12x384 runs kept under --out/gpt12x384_*/ (each a star_in_weights.py run
at batch 256 on G(d,5), hardest token, made by hand with the command in the README's "Recipe study",
its lever and seed read from its own results.json) and writes levers.md (the step at which held-out
first-token accuracy first reached 0.90, per degree, lever and seed; what the run had memorized by
then) and levers.png (the held-out curves, a panel per degree). Nothing is run.

Every file is written to a temp file, then renamed (sweep.atomic_write): an interrupted run leaves the
study as it was. Bad input (an --out that is a file, an unknown flag) is a one-line error, exit status 2,
before anything runs.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import statistics
import subprocess
import sys

import sweep

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs", "study")
PROXY = ["hardest_token=true", "layers=4", "width=128", "heads=4", "batch_size=256", "warmup=300", "steps=4000",
         "eval_every=250", "device=cpu", "stop_at=0.9"]
# name -> (sweep folder, the recipe's flags, degrees, seeds)
SWEEPS = {
    "embed x10, wd 0.1": ("recipe_x10_wd0.1", ["embed_lr_mult=10", "weight_decay=0.1"], [100, 200, 400, 800, 1600], [0, 1, 2]),
    "old default (x1, wd 0.01)": ("default_x1_wd0.01", ["embed_lr_mult=1", "weight_decay=0.01"], [200, 800, 1600], [0]),
}
GRID_D400 = ("grid_d400", [400], [0])  # embed_lr_mult x weight_decay at d = 400, one seed
GRID_MULTS, GRID_WDS = [3, 10, 30], [0.01, 0.1]
LEVELS = (0.5, 0.9)


def sweep_command(folder: str, flags: list[str], degrees: list[int], seeds: list[int], grid: list[str] = ()) -> list[str]:
    cmd = [sys.executable, os.path.join(HERE, "sweep.py"), "star_in_weights.py",
           "--grid", "degree=" + ",".join(map(str, degrees)), *[a for g in grid for a in ("--grid", g)],
           "--seeds", ",".join(map(str, seeds)), "--out", os.path.join(RUNS, folder), "--jobs", "1", "--x", "degree",
           "--metric", "peak_test_first_token", *[a for lv in LEVELS for a in ("--reach", f"test_first_token>={lv}")]]
    return cmd + [a for f in PROXY + flags for a in ("--set", f)]


def all_sweeps() -> list[list[str]]:
    cmds = [sweep_command(folder, flags, ds, seeds) for folder, flags, ds, seeds in SWEEPS.values()]
    folder, ds, seeds = GRID_D400
    grid = ["embed_lr_mult=" + ",".join(map(str, GRID_MULTS)), "weight_decay=" + ",".join(map(str, GRID_WDS))]
    return cmds + [sweep_command(folder, [], ds, seeds, grid)]


def read_runs(folder: str) -> list[dict]:
    """One row per finished point of a sweep folder (its points/*/results.json)."""
    rows, points = [], os.path.join(RUNS, folder, "points")
    for key in sorted(os.listdir(points)) if os.path.isdir(points) else []:
        path = os.path.join(points, key, "results.json")
        if not os.path.exists(path):
            continue
        res = json.load(open(path))
        cfg, m = res["config"], res["metrics"]
        row = {"degree": cfg["degree"], "seed": cfg["seed"], "embed_lr_mult": cfg["embed_lr_mult"],
               "weight_decay": cfg["weight_decay"], "final_step": res["history"][-1]["step"],
               "peak_test_first_token": m["peak_test_first_token"], "edge_topk": m["edge_topk"],
               "train_first_token": m["train_first_token"]}
        for lv in LEVELS:
            step, epoch = sweep.first_reach(res["history"], "test_first_token", lv)
            row[f"step_{int(lv * 100)}"], row[f"epoch_{int(lv * 100)}"] = step, epoch
        rows.append(row)
    return rows


def power_fit(ds: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares fit y = c * d^alpha on log-log axes: (c, alpha)."""
    if len(set(ds)) < 2:
        return None
    lx, ly = [math.log(d) for d in ds], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    alpha = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return math.exp(my - alpha * mx), alpha


def summarize(rows: list[dict]) -> list[dict]:
    """Per degree: runs, how many reached 90%, median / min / max steps and epochs to 50% and 90%."""
    table = []
    for d in sorted({r["degree"] for r in rows}):
        members = [r for r in rows if r["degree"] == d]
        entry = {"degree": d, "runs": len(members), "seeds": sorted(r["seed"] for r in members),
                 "edge_topk_min": min(r["edge_topk"] for r in members),
                 "peak_median": statistics.median(r["peak_test_first_token"] for r in members)}
        for lv in ("50", "90"):
            for unit in ("step", "epoch"):
                vals = [r[f"{unit}_{lv}"] for r in members if r[f"{unit}_{lv}"] is not None]
                entry[f"{unit}_{lv}"] = vals
                # the median counts runs that never got there as +inf: a median over the finishers would flatter
                padded = sorted(vals + [math.inf] * (len(members) - len(vals)))
                entry[f"{unit}_{lv}_median"] = statistics.median(padded) if padded else None
        table.append(entry)
    return table


def plot(tables: dict[str, list[dict]], fits: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, unit in zip(axes, ("step", "epoch")):
        for name, table in tables.items():
            pts = [(t["degree"], t[f"{unit}_90_median"], min(t[f"{unit}_90"]), max(t[f"{unit}_90"]))
                   for t in table if t[f"{unit}_90"] and math.isfinite(t[f"{unit}_90_median"])]
            missed = [t["degree"] for t in table if not t[f"{unit}_90"]]
            if pts:
                d, y, lo, hi = zip(*pts)
                line = ax.errorbar(d, y, yerr=[[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]],
                                   marker="o", capsize=3, label=name)
                fit = fits.get(name, {}).get(unit)
                if fit:
                    xs = [min(d), max(d)]
                    ax.plot(xs, [fit[0] * x ** fit[1] for x in xs], ls=":", color=line[0].get_color(),
                            label=f"fit ~ d^{fit[1]:.2f}")
            if missed and unit == "step":  # drawn at the cap: "not by then"
                ax.scatter(missed, [4000] * len(missed), marker="x", color="k", zorder=3,
                           label=f"{name}: not reached by the 4,000-step cap")
        ax.set(xscale="log", yscale="log", xlabel="degree d of G(d,5)",
               ylabel=f"{unit}s to 90% held-out first token (median, min..max)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("In-weights path-star, GPT 4x128, batch 256 (CPU): time to generalize against d", fontsize=9)
    sweep.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))  # format: tmp has no .png
    plt.close(fig)


def aggregate(out: str) -> dict | None:
    """The study's table, fits and figure into `out`; None, with nothing written, when no sweep point has finished
    (the kept study is not overwritten with an empty one)."""
    sweep_rows = {name: read_runs(folder) for name, (folder, _, _, _) in SWEEPS.items()}
    if not any(sweep_rows.values()):
        return None
    os.makedirs(out, exist_ok=True)
    tables, fits, all_rows = {}, {}, []
    for name, rows in sweep_rows.items():
        all_rows += [{"recipe": name, **r} for r in rows]
        if not rows:
            continue
        tables[name] = table = summarize(rows)
        for unit in ("step", "epoch"):
            pts = [(t["degree"], t[f"{unit}_90_median"]) for t in table
                   if t[f"{unit}_90_median"] is not None and math.isfinite(t[f"{unit}_90_median"])]
            fit = power_fit(*zip(*pts)) if len(pts) >= 2 else None
            if fit:
                fits.setdefault(name, {})[unit] = fit
    grid = [{"recipe": f"d=400 grid: x{r['embed_lr_mult']:g}, wd {r['weight_decay']:g}", **r}
            for r in read_runs(GRID_D400[0])]
    all_rows += grid
    keys = list(dict.fromkeys(k for r in all_rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(all_rows)
    sweep.write_text(os.path.join(out, "study.csv"), buf.getvalue())
    lines = ["# Recipe study: steps to generalize on G(d,5), GPT 4x128, batch 256, cap 4,000 steps", "",
             "| recipe | d | seeds | steps to 50% (median; each) | steps to 90% (median; each) | epochs to 90% (median) "
             "| peak held-out (median) | edge top-k (min) |", "|---|---|---|---|---|---|---|---|"]
    show = lambda v: "never" if v is None or not math.isfinite(v) else f"{v:.0f}" if v >= 10 else f"{v:.1f}"  # noqa: E731
    for name, table in tables.items():
        for t in table:
            lines.append(f"| {name} | {t['degree']} | {','.join(map(str, t['seeds']))} | {show(t['step_50_median'])}; "
                         f"{t['step_50']} | {show(t['step_90_median'])}; {t['step_90']} | {show(t['epoch_90_median'])} | "
                         f"{t['peak_median']:.3f} | {t['edge_topk_min']:.4f} |")
    lines += ["", "Fits of the median steps / epochs to 90% against d (least squares on log-log axes):", ""]
    for name, f in fits.items():
        lines += [f"- {name}: " + "; ".join(f"{u}s = {c:.3g} d^{a:.2f}" for u, (c, a) in f.items())]
    if grid:
        lines += ["", "## d = 400, one seed: embedding-LR multiplier x weight decay", "",
                  "| multiplier | weight decay | steps to 50% | steps to 90% | peak held-out | edge top-k |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(grid, key=lambda r: (r["embed_lr_mult"], r["weight_decay"])):
            lines.append(f"| {r['embed_lr_mult']:g} | {r['weight_decay']:g} | {show(r['step_50'])} | {show(r['step_90'])} | "
                         f"{r['peak_test_first_token']:.3f} | {r['edge_topk']:.4f} |")
    sweep.write_text(os.path.join(out, "study.md"), "\n".join(lines) + "\n")
    if tables:
        plot(tables, fits, os.path.join(out, "steps_to_90.png"))
    print("\n".join(lines))
    return {"tables": tables, "fits": fits}


# ----------------------------------------------------------------------------- the paper's 12x384: the levers
LEVER_LEVEL = 0.9


def lever_name(cfg: dict) -> str:
    return (f"embedding x{cfg['embed_lr_mult']:g}" + ("" if cfg["lr"] == 3e-4 else f", body LR {cfg['lr']:.0e}".replace("e-0", "e-"))
            + ("" if cfg["batch_size"] == 256 else f", batch {cfg['batch_size']}"))


def lever_order(name: str) -> tuple:  # the embedding multiplier's runs first, by multiplier; then the other levers
    return "," in name, float(name.split(" x")[1].split(",")[0]), name


def read_lever_runs(root: str) -> list[dict]:
    """One row per results.json below root/gpt12x384_*/ (12 layers, width 384): its degree, lever, seed, step
    cap, the step at which held-out first token first reached LEVER_LEVEL (None: never), and its curve."""
    rows = []
    for folder in sorted(glob.glob(os.path.join(root, "gpt12x384_*"))):
        for dirpath, _, files in sorted(os.walk(folder)):
            if "results.json" not in files:
                continue
            res = json.load(open(os.path.join(dirpath, "results.json")))
            cfg, hist = res["config"], res["history"]
            if (cfg["layers"], cfg["width"]) != (12, 384):
                continue
            step, _ = sweep.first_reach(hist, "test_first_token", LEVER_LEVEL)
            at = next((h for h in hist if h["step"] == step), hist[-1])  # the evaluation that stopped it, or the last
            rows.append({"degree": cfg["degree"], "lever": lever_name(cfg), "seed": cfg["seed"], "cap": cfg["steps"],
                         "step_90": step, "last_step": hist[-1]["step"],
                         "held_out": at["test_first_token"], "edge_top1_valid": at["edge_top1_valid"],
                         "train_first_token": at["train_first_token"], "seconds": res["seconds"],
                         "folder": os.path.relpath(dirpath, root),
                         "curve": [(h["step"], h["test_first_token"]) for h in hist]})
    return sorted(rows, key=lambda r: (r["degree"], lever_order(r["lever"]), r["seed"]))


def levers(out: str, rows: list[dict]) -> None:
    """levers.md and levers.png in `out` from read_lever_runs' rows."""
    degrees = sorted({r["degree"] for r in rows})
    names = sorted({r["lever"] for r in rows}, key=lever_order)
    seeds = sorted({r["seed"] for r in rows})
    cell = lambda r: f"{r['step_90']:,}" if r["step_90"] is not None else f"never ({r['held_out']:.2f} at {r['last_step']:,})"  # noqa: E731
    lines = [f"# The paper's GPT 12x384 on G(d,5), hardest token, batch 256: step at which held-out first-token "
             f"accuracy first reached {LEVER_LEVEL:.2f} (evaluated every 250 steps)", "",
             "| lever | " + " | ".join(f"d = {d}, seed {s}" for d in degrees for s in seeds) + " |",
             "|---|" + "---|" * (len(degrees) * len(seeds))]
    for name in names:
        got = {(r["degree"], r["seed"]): r for r in rows if r["lever"] == name}
        lines.append(f"| {name} | " + " | ".join(cell(got[d, s]) if (d, s) in got else "" for d in degrees for s in seeds) + " |")
    lines += ["", "Every run: body LR 3e-4 unless named, weight decay 0.1, warmup 300, cosine over its step cap, "
              "stopped at the first evaluation >= 0.90 (`--stop-at 0.9`).", "",
              "| d | lever | seed | step cap | step to 0.90 | held-out there (or at the end) | edge top-1 valid there "
              "| training first token there | seconds | folder |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['degree']} | {r['lever']} | {r['seed']} | {r['cap']:,} | {cell(r)} | {r['held_out']:.3f} | "
                     f"{r['edge_top1_valid']:.3f} | {r['train_first_token']:.3f} | {r['seconds']:,.0f} | {r['folder']} |")
    sweep.write_text(os.path.join(out, "levers.md"), "\n".join(lines) + "\n")
    plot_levers(rows, degrees, names, os.path.join(out, "levers.png"))
    print("\n".join(lines))


def plot_levers(rows: list[dict], degrees: list[int], names: list[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(degrees), figsize=(4.2 * len(degrees), 3.8), layout="constrained", squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for ax, d in zip(axes[0], degrees):
        for r in (r for r in rows if r["degree"] == d):
            steps, acc = zip(*r["curve"])
            ax.plot(steps, acc, marker=".", color=colors[r["lever"]], ls="-" if r["seed"] == 0 else "--",
                    label=f"{r['lever']}, seed {r['seed']}")
        ax.axhline(LEVER_LEVEL, color="k", lw=0.6, ls=":")
        ax.set(title=f"G({d},5)", xlabel="training step", ylabel="held-out first-token accuracy", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("GPT 12x384, batch 256 (CPU): the embedding-LR multiplier and the body LR", fontsize=9)
    sweep.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def fail(message: str):
    print(f"recipe_study: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n")[:2]))
    p.error = fail  # one line, exit status 2, no usage dump (as sweep.py and common.cli)
    p.add_argument("--run", action="store_true", help="run the sweeps first (finished points are skipped)")
    p.add_argument("--levers", action="store_true", help="only the 12x384 levers: levers.md and levers.png")
    p.add_argument("--out", default=os.path.join("results", "recipe_study"),
                   help="where the summary goes; the default regenerates the committed, curated study on purpose "
                        "(give another folder to keep it)")
    args = p.parse_args(argv)
    problem = sweep.out_problem(args.out)  # before the ~1 h of --run, not after
    if problem:
        print(f"recipe_study: {problem}", file=sys.stderr)
        return 2
    if args.run and args.levers:
        print("recipe_study: --levers runs nothing (its runs are made by hand); give one of --run, --levers",
              file=sys.stderr)
        return 2
    if args.levers:
        rows = read_lever_runs(args.out)
        if not rows:
            print(f"recipe_study: no 12x384 run (results.json) under {args.out}/gpt12x384_*; nothing written",
                  file=sys.stderr)
            return 2
        levers(args.out, rows)
        return 0
    if args.run:
        for cmd in all_sweeps():
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=HERE, check=False)
    if aggregate(args.out) is None:
        print(f"recipe_study: no finished sweep point under {RUNS} (run `python recipe_study.py --run` first); "
              "nothing written", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
