"""Prepared GPU sessions (issue 10): each stage is one call of the device tool (~9.5 minutes) that
runs its phases, each stopped at its cap and all of them at --budget seconds from the start. A
session has 15 minutes of device time, the machine's start included: one call, no rerun.

Stage 1 (run on 2026-12-04 on one H200; results/gpu_check/, README rows 1-9 and "Speed"):
  env        nvidia-smi, torch / CUDA versions
  headline   star_in_weights.py --degree 5000 --hardest-token, as the README gives it, alone on the GPU,
             with an empty compile cache (its wall time includes start-up and compilation)
  smoke      every other GPU default for a few hundred steps and the tests that need CUDA
             (pytest test_all.py -k "cuda or mamba_ssm"), side by side on the one GPU (crash check)
  bench      star_in_weights.py --degree 5000 --hardest-token --bench (steps/s, examples/s, MFU, x release),
             then the same with --compile-mode reduce-overhead (CUDA graphs)
Stage 2 (what the throughput and the standards need to know first):
  env        as above
  determinism the headline's configuration for 300 steps, twice with one seed in the default mode and
             twice with --deterministic, the four side by side (150 s cap): are the science metrics the same
             (the kit's standard), and what do deterministic kernels cost (steps/s after the first
             evaluation: the whole run's is mostly its cold compile); a kernel that stayed nondeterministic
             (warn_only) or a compile without CUDA graphs is named from the logs
  profile    the bench with --profile, one after the other: in both compile modes, whole model against
             --regional-compile (one layer compiled for all 12: compile + 30 steps 65-74 -> 28-30 s on
             the CPU, the step the same within noise there) and --merge-sets (one forward over a step's
             edges and paths: ~40% fewer kernels by inductor's count on the CPU): torch.profiler's table
             and, per step, kernels, launches, graph launches and GPU busy time against wall time, and the
             first 30 steps' seconds (compile; the default mode's whole-model cache is warm from
             determinism, every other one cold); each run stopped at 120 s of its own (goal runs: 240 s),
             so that one that hangs does not take the next ones' time
Stage 3 (the headline's 120 s goal; 239 s cold in the default mode, 85 s warm with CUDA graphs at 0.922):
  env        as above
  goal       the headline with CUDA graphs and --stop-at 0.95, alone, one run after the other, each from an
             empty compile cache (a user's first run): over 6,000 steps (margin), then with the levers,
             most telling first: an embedding LR x60 (on the CPU it lifted the 12x384 off zero sooner),
             --regional-compile (the cold start), with --merge-sets too, batch 4,096 (throughput), a body
             LR 5e-4 (slower and unsteady on the CPU). ~2-3 min each (estimated, not measured): the last
             may not start; reorder GOAL by what stage 2 measured before running it
Stages 4-9 (the other defaults at their whole budgets):
  env        as above
  full       the defaults at their whole budgets with --compile-mode reduce-overhead (speed only), two at a
             time, the failure claims first, each stage sized to fit one call by ESTIMATE (`--plan` prints
             it): see STAGES and FULL below
Nothing of a run is lost at a cap: its log holds the progress lines so far. runs.tar.gz is written before the
summary is built, and a summary that fails says so in summary.md: the logs come back whatever happens. NEXT_STAGE names the first
stage not yet run; a session that runs one moves it on.

Commands (from the repository root)
    python3 gpu_check.py --out $OUT                    # on the GPU machine: the next stage (python3 holds torch there)
    python3 gpu_check.py --out $OUT --stage 3          # another stage
    python gpu_check.py --plan [--stage N]             # print every command, run nothing
    python gpu_check.py --cpu-rehearsal --out /tmp/gc  # the same plumbing on a CPU at --quick sizes
Writes into --out (at most 3 files, as the device tool brings back 8): summary.md (the table; also
printed last, with the GPU's utilization, clock, power and temperature per phase), summary.json,
runs.tar.gz (each run's folder: results.json, figures, log.txt; gpu_samples.csv, nvidia-smi every 5 s).
The runs themselves work under --work (default /tmp/gpu_check).
Afterwards, on the developer's machine: unpack runs.tar.gz, keep each run's results.json and log.txt
under results/gpu_check/ (stage 1: headline/ as results/gpu_headline/), and put the measured numbers
in the README's rows. The phases fit one 600 s call (--budget 570) plus the machine's start.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
SMOKE_STEPS = ["--steps", "300", "--warmup", "100", "--eval-every", "100"]  # a few hundred steps of a default

# (name, script, the claim's own flags (kept in a CPU rehearsal), the scale flags (replaced there by --quick))
BENCH = [("bench", "star_in_weights.py", ["--hardest-token", "--bench"], ["--degree", "5000"]),
         ("bench_cuda_graphs", "star_in_weights.py", ["--hardest-token", "--bench", "--compile-mode", "reduce-overhead"],
          ["--degree", "5000"])]  # the lean probe's lever: CUDA graphs around the step
HEADLINE = ("headline", "star_in_weights.py", ["--hardest-token"], ["--degree", "5000"])
SMOKE = [
    ("full_path", "star_in_weights.py", [], ["--degree", "5000", *SMOKE_STEPS]),
    ("full_path_d10000_l10", "star_in_weights.py", [],  # the largest default: vocabulary 90,009, width 784
     ["--degree", "10000", "--path-length", "10", "--width", "784", *SMOKE_STEPS]),
    ("mamba", "star_in_weights.py", ["--hardest-token", "--model", "mamba"], ["--degree", "5000", *SMOKE_STEPS]),
    ("mamba_release_eager", "star_in_weights.py", ["--hardest-token", "--model", "mamba", "--mamba-block", "release",
                                                  "--no-compile"], ["--degree", "5000", *SMOKE_STEPS]),
    ("forward_edges", "star_in_weights.py", ["--hardest-token", "--edges", "forward"], ["--degree", "5000", *SMOKE_STEPS]),
    ("reverse_path", "star_in_weights.py", ["--reverse-path"], ["--degree", "5000", *SMOKE_STEPS]),
    ("pauses0", "star_in_weights.py", ["--pauses", "0"],  # Fig 35 measures the path: beside full_path
     ["--degree", "5000", *SMOKE_STEPS]),
    ("staged", "star_in_weights.py", ["--hardest-token", "--recipe", "staged"],
     ["--degree", "5000", "--edge-steps", "150", "--steps", "150", "--warmup", "50", "--eval-every", "50"]),
    ("freeze_embeddings", "freeze_embeddings.py", [], SMOKE_STEPS),
    ("tree_star", "tree_star.py", [], SMOKE_STEPS),
    ("star_in_context", "star_in_context.py", [], SMOKE_STEPS),
    ("node2vec_spectral", "node2vec_spectral.py", [], []),
    ("tiny_graphs", "tiny_graphs.py", [], ["--steps-scale", "0.05", "--eval-points", "10"]),
    ("tiny_graphs_regularizers", "tiny_graphs.py", ["--study", "regularizers"],
     ["--steps-scale", "0.05", "--eval-points", "10"]),
]
# one seed twice, without and with deterministic kernels (cold compiles side by side, as two users' runs);
# "_a" and "_b" runs are compared in the summary
SAME_SEED_STEPS = ["--steps", "300", "--warmup", "100", "--eval-every", "150"]
SAME_SEED = [(f"{arm}_{rep}", "star_in_weights.py", ["--hardest-token", *flags], ["--degree", "5000", *SAME_SEED_STEPS])
             for rep in "ab" for arm, flags in (("same_seed", []), ("deterministic", ["--deterministic"]))]
CG = ["--compile-mode", "reduce-overhead"]  # CUDA graphs: 2.2x the default mode's steps/s on one H200 (speed only)
REGIONAL, MERGED = ["--regional-compile"], ["--merge-sets"]
# where the step's time goes: the default mode's 35-45 ms (host-bound, drifting within a run), the CUDA-graph
# step's 16 ms (the way past 14.5x the release); what compiling one layer instead of the whole model saves of the
# cold start and costs per step (12 compiled calls a forward, each with its own guards and graph launch), and what
# one forward over the edges and paths saves; the first ~30 s (cache warm), the others ~40-100 s (cold compiles; estimates)
PROFILE = [(f"bench_profile{name}", "star_in_weights.py", ["--hardest-token", "--bench", "--profile", *flags],
            ["--degree", "5000"])
           for name, flags in (("", []), ("_cuda_graphs", CG), ("_cuda_graphs_regional", [*CG, *REGIONAL]),
                               ("_cuda_graphs_merged", [*CG, *MERGED]), ("_merged", MERGED), ("_regional", REGIONAL))]
# The defaults at their whole budgets, with CUDA graphs, two at a time (LANES), each stage sized by ESTIMATE to fit
# one call, the failure claims first; in a stage the run most likely to overrun comes last, so that only it is lost
FULL = {
    4: [("forward_edges", "star_in_weights.py", ["--hardest-token", "--edges", "forward", *CG], ["--degree", "5000"]),
        ("freeze_embeddings", "freeze_embeddings.py", CG, []),
        ("full_path", "star_in_weights.py", CG, ["--degree", "5000"])],
    5: [("star_in_context", "star_in_context.py", CG, []),
        ("reverse_path", "star_in_weights.py", ["--reverse-path", *CG], ["--degree", "5000"]),
        # stage 1's compiled scan made 3.5 steps/s without graphs, beside two other runs (4,000 steps at that rate:
        # ~19 min, past a call): with them it is untried; last, so that an overrun (or a fallback) costs only itself
        ("mamba", "star_in_weights.py", ["--hardest-token", "--model", "mamba", *CG], ["--degree", "5000"])],
    6: [("tree_star", "tree_star.py", CG, []),
        ("pauses0", "star_in_weights.py", ["--pauses", "0", *CG], ["--degree", "5000"])],
    7: [("staged", "star_in_weights.py", ["--hardest-token", "--recipe", "staged", *CG], ["--degree", "5000"])],
    8: [("full_path_d10000_l10", "star_in_weights.py", CG, ["--degree", "10000", "--path-length", "10", "--width", "784"])],
    9: [("full_path_d10000_l6", "star_in_weights.py", CG, ["--degree", "10000", "--path-length", "6"])],
}
LANES = {"full": 2}  # runs at once in these phases (the others in AT_ONCE: all of them): an overrun stops the last
# Sizing the whole-budget stages, an estimate (not a measurement) of each run alone on the GPU with CUDA graphs:
# the training steps of each arm x its TFLOP a step / TFLOP/s, plus evaluations x seconds each. TFLOP a step:
# common.model_flops_per_step on the run's own data and model (read on the CPU by capturing its train() calls;
# test_gpu_check_estimates_match_the_runs checks the first of each). TFLOP/s: 43.5, the CUDA-graph headline's
# (0.731 TFLOP a step at 59.4 steps/s over 4,000 steps); 62 for the width-784 model (its default-mode smoke made
# 62 at 4.19 TFLOP a step). Seconds an evaluation: stage 1's smoke runs, eval_seconds over evaluations (an upper
# bound: 15 runs shared the GPU then; G(10^4,6) had none, so G(10^4,10)'s). The Mamba's is its FLOPs only.
ESTIMATE = {  # name: ([(steps, TFLOP a step) per arm or stage], TFLOP/s, evaluations, seconds an evaluation)
    "forward_edges": ([(4000, 0.825), (4000, 0.853)], 43.5, 34, 1.0),  # the arm; its control, both directions
    "freeze_embeddings": ([(10, 0.0001), (4000, 0.731), (4000, 0.731)], 43.5, 34, 0.15),  # (a); (b) frozen, trainable
    "full_path": ([(4000, 0.853)], 43.5, 17, 2.65),
    "star_in_context": ([(6000, 1.021), (6000, 1.021)], 43.5, 50, 0.46),  # next-token, reverse
    "reverse_path": ([(4000, 0.853)], 43.5, 17, 2.65),
    "mamba": ([(4000, 0.440)], 43.5, 17, 0.6),
    "tree_star": ([(4000, 1.035), (4000, 1.035)], 43.5, 34, 1.7),  # split at the leaf, at the first token
    "pauses0": ([(4000, 0.741), (4000, 0.853)], 43.5, 34, 1.85),  # 0 pauses; the control's 5
    "staged": ([(10000, 0.618), (4000, 1.928)], 43.5, 57, 1.5),  # edges alone, then paths alone
    "full_path_d10000_l10": ([(4000, 4.189)], 62.0, 17, 6.7),
    "full_path_d10000_l6": ([(4000, 1.044)], 43.5, 17, 6.7),
}
STAGE_SECONDS = 485  # what a call leaves the runs: --budget 570 less RESERVE, env (~8 s) and a cold compile (~52 s)


def estimate_seconds(name: str) -> float:
    arms, tflops, evals, per_eval = ESTIMATE[name]
    return sum(steps * tflop for steps, tflop in arms) / tflops + evals * per_eval


# The 120 s goal, one run at a time (clean wall times), each from its own empty compile cache, the most telling
# first: does 0.95 come, and when. The 12x384 on G(200,5) on the CPU (README "Recipe study"): embedding x60 was
# at 0.74 / 0.80 at step 500 (seeds 0 / 1) where x30 was at 0.00 / 0.20, and at 0.90 at step 1,250 / 1,000
# against 1,250 / 2,000; body LR 5e-4 (seed 0) dipped (0.72 -> 0.48) and reached 0.90 an evaluation later.
# On G(400,5) x60 reached 0.90 at step 1,750 / 2,000 (seeds 0 / 1) against x30's 3,750 / never within 4,000
# (0.83); on G(800,5) at 2,500 / 2,250 against 3,250 / 3,750, with x120 at 3,000 (seed 0): x60 ahead or tied
# in all six pairs, by no trend with d (`python recipe_study.py --levers`), and x120 no better than x60
GOAL_FLAGS = ["--hardest-token", *CG, "--stop-at", "0.95"]
GOAL = [(f"goal{name}", "star_in_weights.py", [*GOAL_FLAGS, *lever], ["--degree", "5000", "--steps", "6000"])
        for name, lever in (("", []), ("_embed_x60", ["--embed-lr-mult", "60"]), ("_regional", REGIONAL),
                            ("_regional_merged", [*REGIONAL, *MERGED]), ("_batch4096", ["--batch-size", "4096"]),
                            ("_lr5e-4", ["--lr", "5e-4"]))]
STAGES = {1: "done 2026-12-04 (results/gpu_check/): the headline from a cold start, every default for 300 steps, "
             "the bench",
          2: "one seed twice, without and with --deterministic; the bench profiled in both compile modes, whole "
             "model, --regional-compile and --merge-sets",
          3: "the headline's 120 s goal: CUDA graphs, stop at 0.95, each run from a cold cache; 6,000 steps, then "
             "embedding x60, --regional-compile, with --merge-sets, batch 4,096, body LR 5e-4",
          4: "forward edges, frozen embeddings and the full path G(5000,5) at their whole budgets",
          5: "in-context, reverse path and the Mamba (kit block) at their whole budgets",
          6: "tree-star and pauses 0 at their whole budgets",
          7: "staged training at its whole budget",
          8: "the full path G(10^4,10) at width 784 at its whole budget",
          9: "the full path G(10^4,6) at its whole budget"}
NEXT_STAGE = 2  # the first stage not yet run on a GPU: move it on when a session has run one
CAPS = {"env": 30, "headline": 330, "smoke": 180, "determinism": 150}  # seconds; the last phase gets what is left
# one run's own limit in the phases that run one after another: a run that hangs (a profiler around CUDA graphs
# captured before it, say) or crawls must not take the time of the runs after it
RUN_CAPS = {"profile": 120, "goal": 240}
WARNED = {"compile_skipped_cudagraphs": "skipping cudagraphs",  # torch.compile ran the step without CUDA graphs
          "nondeterministic_kernel_warned": "deterministic"}  # warn_only: a kernel without a deterministic version
AT_ONCE = ("smoke", "full", "determinism")  # phases whose runs share the GPU; the others run alone, one by one
RESERVE = 25  # seconds kept at the end for the summary and the archive
FELL_BACK = "torch.compile failed"  # common.COMPILE_FELL_BACK (a test ties them; this file imports no torch)
PROGRESS = re.compile(r"^step\s+(\d+)/\d+ \|\s+([\d.]+)s \|.*\| test_first_token ([\d.]+)")


GPU_SAMPLE = ("utilization.gpu", "clocks.sm", "power.draw", "temperature.gpu")  # read every SAMPLE_EVERY s of a call
SAMPLE_EVERY = 5.0


def sample_gpu(stop: threading.Event, path: str, every: float = SAMPLE_EVERY) -> None:
    """Until `stop`, one nvidia-smi reading every `every` seconds, appended to `path` as CSV (unix time first):
    how busy the GPU is while runs share it, and whether its clock falls during a long run (heat, power) as the
    default mode's step time rises from 35 to 45 ms. Returns at once where there is no nvidia-smi."""
    with open(path, "w") as f:
        f.write(",".join(("time", *GPU_SAMPLE)) + "\n")
        while not stop.wait(every):
            try:
                out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(GPU_SAMPLE)}", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            values = [v.strip() for v in (out.splitlines() or [""])[0].split(",")]  # the first GPU
            if len(values) == len(GPU_SAMPLE):
                f.write(",".join((f"{time.time():.1f}", *values)) + "\n")
                f.flush()


def gpu_rows(path: str, windows: list[tuple[str, float, float]]) -> list[str]:
    """One line per phase from sample_gpu's readings inside its time window: mean utilization, SM clock range,
    peak power and temperature (a reading the driver gives as "[N/A]" is left out)."""
    if not os.path.exists(path):
        return []
    number = lambda v: float(v) if re.fullmatch(r"-?[\d.]+", v) else None  # noqa: E731
    samples = [[number(v) for v in line.split(",")] for line in open(path).read().splitlines()[1:]]
    rows = []
    for phase, t0, t1 in windows:
        inside = [s for s in samples if s[0] is not None and t0 <= s[0] <= t1]
        column = lambda i: [s[i] for s in inside if s[i] is not None]  # noqa: E731
        util, clock, power, temp = (column(i) for i in range(1, 5))
        if not util:
            continue
        rows.append(f"{phase}: GPU utilization mean {sum(util) / len(util):.0f}% over {len(util)} readings"
                    + (f", SM clock {min(clock):.0f}-{max(clock):.0f} MHz" if clock else "")
                    + (f", power up to {max(power):.0f} W" if power else "")
                    + (f", temperature up to {max(temp):.0f} C" if temp else ""))
    return rows


def command(spec, work: str, rehearsal: bool) -> list[str]:
    name, script, claim, scale = spec
    sizes = ["--quick", "--device", "cpu"] if rehearsal else ["--device", "cuda", *scale]
    return [PY, os.path.join(HERE, script), *claim, *sizes, "--out", os.path.join(work, name)]


def plan(work: str, rehearsal: bool, stage: int = NEXT_STAGE) -> list[tuple[str, list[list[str]], dict]]:
    """[(phase, [(name, argv), ...], env overrides)] of one stage; the runs of an AT_ONCE phase share the GPU."""
    cuda_tests = [PY, "-m", "pytest", os.path.join(HERE, "test_all.py"), "-k", "cuda or mamba_ssm", "-q", "-rs"]
    probe = ["bash", "-c", "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm "
             "--format=csv; nproc; " + f"'{PY}' -c \"import torch; print('torch', torch.__version__, 'cuda', "
             "torch.version.cuda, 'available', torch.cuda.is_available())\""]
    env_phase = ("env", [("env", probe)], {})  # every stage starts with it
    runs = lambda specs: [(spec[0], command(spec, work, rehearsal)) for spec in specs]  # noqa: E731
    if stage == 1:
        cold = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor_cache_headline")}  # a cold compile, as a user's
        # side by side, each process compiles in itself: a worker pool per process (one per core by default)
        # would put ~15 x 16 compiler processes on 16 cores and 128 GB
        one_thread = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}
        return [env_phase, ("headline", runs([HEADLINE]), cold),
                ("smoke", [("cuda_tests", cuda_tests)] + runs(SMOKE), one_thread), ("bench", runs(BENCH), {})]
    few = {"TORCHINDUCTOR_COMPILE_THREADS": "2"}  # 2-4 processes on the machine's 8 cores
    if stage == 2:
        return [env_phase, ("determinism", runs(SAME_SEED), few), ("profile", runs(PROFILE), {})]
    if stage == 3:  # "{name}": each run its own cache (run_group fills it in)
        return [env_phase, ("goal", runs(GOAL), {"TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor_cache_{name}")})]
    return [env_phase, ("full", runs(FULL[stage]), few)]


def gpu_memory_gb() -> float:
    """The first GPU's memory from nvidia-smi (0 without one); the driver itself holds no CUDA context."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.split()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return 0.0


def env_for(env_extra: dict, name: str) -> dict:
    """A run's own extra environment: "{name}" in a value becomes the run's name (a compile cache of its own, say)."""
    return {k: v.replace("{name}", name) for k, v in env_extra.items()}


def run_group(runs, env_extra: dict, cap: float, work: str, parallel: int, run_cap: float | None = None) -> list[dict]:
    """Start the runs (at most `parallel` at once), stop any still going at `cap` seconds from the start, or
    `run_cap` seconds from its own; one log each, env_extra as env_for makes it for each run."""
    threads = 1 if parallel > 1 else min(8, os.cpu_count() or 1)  # side by side: one host thread each
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    pending, active, done, start = list(runs), [], [], time.time()
    while pending or active:
        while pending and len(active) < parallel:
            name, argv = pending.pop(0)
            os.makedirs(os.path.join(work, name), exist_ok=True)
            log = open(os.path.join(work, name, "log.txt"), "w")
            log.write(" ".join(argv) + "\n")
            log.flush()
            run_env = {**env, **env_for(env_extra, name)}
            active.append((name, argv, log, time.time(), subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                                          cwd=HERE, env=run_env)))
        time.sleep(0.5)
        for item in list(active):
            name, argv, log, t0, proc = item
            over = time.time() - start > cap or (run_cap is not None and time.time() - t0 > run_cap)
            if proc.poll() is None and not over:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            active.remove(item)
            done.append({"name": name, "argv": argv, "seconds": round(time.time() - t0, 1),
                         "status": "cap" if over and proc.returncode < 0 else f"rc={proc.returncode}"})
        if time.time() - start > cap:  # the cap also covers runs not yet started
            done += [{"name": n, "argv": a, "seconds": 0.0, "status": "not started (cap)"} for n, a in pending]
            pending = []
    return done


def science(res: dict) -> dict:
    """What two runs of one seed and flags must share: results.json less its wall-clock parts."""
    strip = lambda d: {k: v for k, v in d.items() if "seconds" not in k}  # noqa: E731 - history records
    return {"history": [strip(h) for h in res.get("history", [])], "metrics": res.get("metrics"),
            "verdict_value": res.get("verdict", {}).get("value")}


def first_difference(a: dict, b: dict) -> str:
    """'' when two science() dicts are equal, else where they first part: the step and the metric."""
    for ha, hb in zip(a["history"], b["history"]):
        for k in sorted(set(ha) | set(hb)):
            if ha.get(k) != hb.get(k):
                return f"step {ha.get('step')}: {k} {ha.get(k)} against {hb.get(k)}"
    if len(a["history"]) != len(b["history"]):
        return f"{len(a['history'])} against {len(b['history'])} evaluations"
    for key in ("metrics", "verdict_value"):
        if a[key] != b[key]:
            return f"the final {key} (the histories agree)"
    return ""


def steady_rate(history: list[dict]) -> float | None:
    """Steps/s from the first evaluation after step 0 to the last, evaluations included: a 300-step run's
    speed.steps_per_s is mostly its cold compile (the first interval), which would hide what a mode costs."""
    if len(history) < 3 or history[-1]["seconds"] <= history[1]["seconds"]:
        return None
    return round((history[-1]["step"] - history[1]["step"]) / (history[-1]["seconds"] - history[1]["seconds"]), 2)


def describe(run: dict, work: str) -> dict:
    """The run's verdict, speed and last progress line, read from its folder."""
    folder = os.path.join(work, run["name"])
    lines = open(os.path.join(folder, "log.txt")).read().splitlines()
    run["last_line"] = next((ln for ln in reversed(lines) if ln.strip()), "")[:300]
    run["compile_fell_back"] = any(FELL_BACK in ln for ln in lines)  # a compile lever's run that ran eager
    # warnings the log holds: with --deterministic a "no deterministic implementation" warning says a kernel
    # stayed nondeterministic (warn_only), with CUDA graphs a "skipping cudagraphs" one that none were used
    run.update({key: any(text in ln and "warn" in ln.lower() for ln in lines) for key, text in WARNED.items()})
    # the progress lines (common.progress_line), so that a run stopped at its cap still shows its curve
    run["history"] = [{"step": int(m.group(1)), "seconds": float(m.group(2)), "test_first_token": float(m.group(3))}
                      for m in map(PROGRESS.search, lines) if m]
    path = os.path.join(folder, "results.json")
    if os.path.exists(path):
        res = json.load(open(path))
        v = res.get("verdict", {})
        run.update(device=res.get("device"), reproduced=v.get("reproduced"), value=v.get("value"),
                   run_seconds=res.get("seconds"), speed=res.get("speed"),
                   history=[{k: h.get(k) for k in ("step", "seconds", "test_first_token", "test_exact")}
                            for h in res.get("history", [])])
        if run.get("phase") == "determinism":  # compared pairwise in the table
            run["science"] = science(res)
            run["steady_steps_per_s"] = steady_rate(res.get("history", []))
    return run


def table(runs: list[dict]) -> str:
    rows = ["| phase | run | status | wall s | device | reproduced | value | last line |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        value = f"{r['value']:.4f}" if isinstance(r.get("value"), (int, float)) else ""
        rows.append(f"| {r['phase']} | {r['name']} | {r['status']} | {r['seconds']} | {r.get('device', '')} | "
                    f"{r.get('reproduced', '')} | {value} | `{r['last_line'][:140].replace('|', '/')}` |")
    for r in runs:  # the headline's (and its goal runs') curve, and when it reached 0.95
        hist = [h for h in (r.get("history") or []) if isinstance(h.get("test_first_token"), (int, float))]
        if (r["name"] == "headline" or r["phase"] == "goal") and hist:
            reach = next((h for h in hist if h["test_first_token"] >= 0.95), None)
            rows.append(f"\n{r['name']} curve (step: held-out first token @ s of training): " + ", ".join(
                f"{h['step']}: {h['test_first_token']:.3f} @ {h['seconds']:.0f}" for h in hist))
            reached = f"step {reach['step']}, {reach['seconds']:.0f} s into training" if reach else "no"
            rows.append(f"{r['name']} reached 0.95: {reached}; the process's wall time, start-up and compilation "
                        f"included: {r['seconds']} s")
    for r in (r for r in runs if r.get("compile_fell_back")):
        rows.append(f"\n{r['name']}: torch.compile failed and the run went on eager (log.txt says why): its "
                    "speed is not its compile lever's")
    named = {r["name"]: r for r in runs}
    for arm in sorted({r["name"][:-2] for r in runs if r["name"].endswith("_a") and r.get("science")}):
        a, b = named.get(f"{arm}_a"), named.get(f"{arm}_b")
        if not (b and b.get("science")):
            rows.append(f"\n{arm}: the second run of the seed has no results.json ({b['status'] if b else 'absent'})")
            continue
        diff = first_difference(a["science"], b["science"])
        speeds = " and ".join(f"{r['speed'].get('steps_per_s')}" for r in (a, b) if r.get("speed"))
        steady = " and ".join(str(r.get("steady_steps_per_s")) for r in (a, b))
        rows.append(f"\n{arm}: same seed twice: " + (f"DIFFER, first at {diff}" if diff else "identical science "
                    f"({len(a['science']['history'])} evaluations, the metrics and the verdict value)")
                    + f"; training steps/s {speeds} (cold compile included); after the first evaluation {steady}")
    for r in runs:
        for key in (k for k in WARNED if r.get(k)):
            rows.append(f"\n{r['name']}: its log warns {WARNED[key]!r} ({key}; log.txt in runs.tar.gz)")
    keep = ("steps_per_s", "examples_per_s", "model_tflops_per_s", "mfu", "speedup_vs_release", "warmup_seconds",
            "train_seconds", "eval_seconds", "seconds_to_95pct")
    for timed in (r for r in runs if r["phase"] in ("bench", "headline", "profile", "goal") and r.get("speed")):  # as recorded
        rows.append(f"\n{timed['name']}: " + ", ".join(f"{k} {timed['speed'][k]}" for k in keep if k in timed["speed"]))
        if "profile" in timed["speed"]:  # per step, after the timed window: launches against GPU busy time
            rows.append(f"{timed['name']} profiled: " + ", ".join(f"{k} {v}" for k, v in timed["speed"]["profile"].items()))
    return "\n".join(rows + lever_rows(runs))


def lever_rows(runs: list[dict]) -> list[str]:
    """Each lever's run against its base, the run of its phase whose name is the longest prefix of its own
    (bench_profile_cuda_graphs_regional against bench_profile_cuda_graphs, goal_embed_x60 against goal):
    steps/s, the first 30 steps' seconds (the compile) and, for the goal, when 0.95 came and the wall time."""
    timed = {r["name"]: r for r in runs if r.get("speed")}
    rows = []
    for name, r in timed.items():
        bases = [b for b in timed if name.startswith(b + "_") and timed[b]["phase"] == r["phase"]]
        if not bases:
            continue
        base = timed[max(bases, key=len)]
        pair = lambda key, a=r["speed"], b=base["speed"]: f"{key} {a.get(key)} against {b.get(key)}"  # noqa: E731
        parts = [pair("steps_per_s")] + ([pair("warmup_seconds")] if "warmup_seconds" in r["speed"] else [])
        if r["phase"] == "goal":
            parts += [pair("seconds_to_95pct"), f"wall s {r['seconds']} against {base['seconds']}"]
        rows.append(f"{name} against {base['name']}: " + ", ".join(parts))
    return (["\nEach lever against its base:"] + rows) if rows else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda msg: (print(f"gpu_check.py: error: {msg}", file=sys.stderr), sys.exit(2))  # one line, as the kit
    p.add_argument("--out", default="", help="folder for summary.md, summary.json and runs.tar.gz")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "gpu_check"), help="where the runs write")
    p.add_argument("--stage", type=int, default=NEXT_STAGE, help="which session's plan: " + "; ".join(
        f"{k}: {v}" for k, v in STAGES.items()) + f" (default {NEXT_STAGE}, the first not yet run)")
    p.add_argument("--budget", type=float, default=570.0, help="seconds for all phases together")
    p.add_argument("--parallel", type=int, default=0, help="side-by-side runs at once; 0 = all of them on a GPU of "
                   ">= 70 GB, else 6 (one fp32 step at full width and batch, measured on the CPU: GPT +2.1 GB, "
                   "Mamba +11 GB)")
    p.add_argument("--only", default="", help="comma-separated run names (e.g. env,headline); default: all")
    p.add_argument("--plan", action="store_true", help="print the commands and exit")
    p.add_argument("--cpu-rehearsal", action="store_true", help="the same plumbing on a CPU: every run at --quick")
    args = p.parse_args(argv)
    if not args.plan and not args.out:
        p.error("give --out (or --plan)")
    if args.budget <= RESERVE or args.parallel < 0:
        p.error(f"--budget must exceed {RESERVE} s and --parallel be >= 0")
    if args.stage not in STAGES:
        p.error(f"--stage must be one of {', '.join(map(str, STAGES))}")
    phases = plan(args.work, args.cpu_rehearsal, args.stage)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {n for _, runs, _ in phases for n, _ in runs}
        if unknown:
            p.error(f"--only: no run named {', '.join(sorted(unknown))}")
        phases = [(ph, [r for r in runs if r[0] in names], env) for ph, runs, env in phases]
        phases = [ph for ph in phases if ph[1]]
    if args.plan:
        for phase, runs, env in phases:
            for name, cmd in runs:
                est = f"   (estimate {estimate_seconds(name):.0f} s)" if phase == "full" else ""
                print(f"[{phase}] {name}: {' '.join(cmd)}" + (f"   (env {env_for(env, name)})" if env else "") + est)
            if phase == "full":
                print(f"[{phase}] estimated {sum(estimate_seconds(n) for n, _ in runs):.0f} s of {STAGE_SECONDS} s, "
                      f"{LANES[phase]} at a time")
        return 0
    if args.parallel == 0:  # asked of nvidia-smi only when something will run
        args.parallel = max(len(runs) for _, runs, _ in phases) if gpu_memory_gb() >= 70 else 6
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    os.makedirs(args.out, exist_ok=True)
    start, results, windows = time.time(), [], []
    stop, samples = threading.Event(), os.path.join(args.work, "gpu_samples.csv")
    sampler = threading.Thread(target=sample_gpu, args=(stop, samples), daemon=True)
    sampler.start()
    for phase, runs, env in phases:
        left = args.budget - RESERVE - (time.time() - start)
        cap = min(CAPS.get(phase, left), left)
        if cap < 10:
            results += [{"phase": phase, "name": n, "argv": a, "seconds": 0.0, "status": "skipped (budget)",
                         "last_line": ""} for n, a in runs]
            continue
        print(f"[gpu_check] {phase}: {len(runs)} run(s), cap {cap:.0f} s", flush=True)
        parallel = min(args.parallel, LANES.get(phase, args.parallel)) if phase in AT_ONCE else 1
        t0 = time.time()
        for r in run_group(runs, env, cap, args.work, parallel, RUN_CAPS.get(phase)):
            results.append(describe({"phase": phase, **r}, args.work) if r["status"] != "not started (cap)"
                           else {"phase": phase, **r, "last_line": ""})
        windows.append((phase, t0, time.time()))
    stop.set()
    sampler.join(timeout=15)
    with tarfile.open(os.path.join(args.out, "runs.tar.gz"), "w:gz") as tar:  # first: the logs come back whatever
        for name in sorted(os.listdir(args.work)):  # the summary below may meet
            if not name.startswith("inductor_cache"):
                tar.add(os.path.join(args.work, name), arcname=name)
    try:
        gpu = gpu_rows(samples, windows)
        summary = table(results) + ("\n\nGPU by phase (nvidia-smi every 5 s; gpu_samples.csv in runs.tar.gz):\n" +
                                    "\n".join(gpu) if gpu else "")
    except Exception:  # noqa: BLE001 - a summary bug must not cost the session its results: say it and go on
        summary = "the summary failed (runs.tar.gz holds every run):\n" + traceback.format_exc()
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"gpu_check: {time.time() - start:.0f} s in all\n\n{summary}\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
