"""In-context path-star (Bachmann & Nagarajan 2024): next-token learning fails at ~1/d, the reverse target is learned.

Claim (paper App. A, Fig 13; Fig 34 right). Every example is a fresh path-star G(d, l) whose
node labels are drawn without replacement from 0..N-1 and whose edge list is shuffled. The prompt
is B&N's line `u,v|u,v|...|u,v/source,goal=` (commas dropped) and the target is the path
source -> goal. A next-token (teacher-forced) learner fits every token but the first hop a1 with a
"Clever Hans" rule (follow the child of the previous ground-truth token), so on held-out graphs it
guesses a random arm: first-hop accuracy ~1/d. The reverse target goal -> source needs no planning
and is learned (~100%). Teacherless training (target inputs replaced by `$`) learns the tokens right
to left (a cascade); training on the first hop alone also fails.

Modes (--mode, comma list or "all"): next-token, teacherless, reverse, first-token. Each mode trains
a fresh model (same seed, same init, same data, same budget) and is evaluated on held-out graphs.

Commands
    python star_in_context.py --quick                      # CPU smoke test, ~20 s
    OMP_NUM_THREADS=1 python star_in_context.py --small    # CPU scale: 2x128, embedding LR x10, ~2.5 min
    python star_in_context.py                              # GPU default: G(2,5), next-token vs reverse
    python star_in_context.py --mode teacherless,first-token   # Fig 13: cascade; first token alone fails
    python star_in_context.py --degree 10 --mode next-token,reverse      # Fig 13 larger graphs
    python star_in_context.py --degree 20 --width 784 --mode next-token,reverse
Outputs in --out (default runs/star_in_context/): results.json, star_in_context.png (held-out
first-hop and exact-match curves per mode, per-position accuracy over training for next-token
(teacher-forced) and teacherless).

Expected: next-token first-hop accuracy within a few points of 1/d; reverse exact match >= 0.95.
Measured on a 2-core CPU, `--small` (2x128 model, N = 20, embedding LR x10, batch 48, 1,000 steps per mode,
1,000 held-out graphs; seeds 0, 1, 2; 145 s each): REPRODUCED in 3/3. Reverse: held-out exact match 1.00.
Next-token: greedy first hop 0.518 / 0.492 / 0.490 (chance 0.5), always an arm, while every other token
is fit teacher-forced (1.0): the Clever-Hans rule. Earlier (4x128, batch 128, 3,000 steps, embedding LR
x1, 1,817 s a mode): the same, first hop 0.4895, reverse 1.000.

Settings vs the paper (v1 Table 1: 12 layers, width 384 (784 for d=20), 8 heads, LR 1e-4) and B&N
  - N = 100 node labels by default (B&N: 50, which cannot hold G(20,5)'s 81 nodes).
  - learned positions N(0, 0.02) (B&N's GPT), not the paper's sinusoidal ones: common.py's sinusoidal
    table has amplitude 1 against N(0, 0.02) token embeddings, which drowns the token identities the
    in-context task must match. Measured on CPU (2x64, G(2,5), N=50, reverse): with sinusoidal
    positions the loss stayed at the unigram level ln 50 for 1000 steps; with learned positions the
    model copied the goal and the source (the first and last reverse tokens) within 250 steps.
  - 6000 steps of batch 256 per mode (~8 epochs of 200k graphs), default modes next-token and reverse
    (the verdict's pair): budgeted so the default fits in ~10 minutes on one GPU (B&N trained 100-500
    epochs); the other two modes are a second command. NOT yet run on a GPU.
  - weight decay 0.01 as the paper (B&N's optimizer hard-codes 0), warmup 200 + cosine to LR/10.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

import common as C

SCRIPT = "star_in_context"
MODES = ["next-token", "teacherless", "reverse", "first-token"]
CPU_COMMAND = "OMP_NUM_THREADS=1 python star_in_context.py --small  (~2.5 min)"


@dataclass
class Config:
    # run
    seed: int = C.arg(0, "seed for the data, init and data order")
    device: str = C.arg("auto", "auto = cuda if available, else cpu", ["auto", "cpu", "cuda"])
    out: str = C.arg("", "output folder (default runs/star_in_context/)")
    quick: bool = C.arg(False, "tiny CPU smoke configuration (G(2,5), N=20, 1x32 model, 40 steps per mode)")
    small: bool = C.arg(False, "the claim on a laptop CPU in minutes: G(2,5), N=20, 2x128 model, embedding LR x10, "
                        "1,000 steps of 48 per mode (~2.5 min)")
    compile: bool = C.arg(True, "torch.compile the model on CUDA (ignored on CPU; falls back to eager)")
    compile_mode: str = C.arg("default", "torch.compile mode; reduce-overhead adds CUDA graphs (H200: 2.2x the "
                              "headline's steps/s)", list(C.COMPILE_MODES))
    deterministic: bool = C.arg(False, "same seed, same numbers on a GPU too: torch's deterministic kernels (no atomic-add "
                                "sums); its cost on a GPU is not yet measured (gpu_check.py stage 2)")
    # data
    mode: str = C.arg("next-token,reverse", "comma list of targets to train (one model each), or 'all': "
                      + ", ".join(MODES))
    degree: int = C.arg(2, "d: arms of each path-star (paper: 2, 10, 20)")
    path_length: int = C.arg(5, "l: nodes per source-to-goal path, source included")
    num_nodes: int = C.arg(100, "N: node labels drawn per graph from 0..N-1 (needs N >= d(l-1)+1)")
    n_train: int = C.arg(200000, "fixed training set of freshly sampled graphs")
    n_test: int = C.arg(20000, "held-out graphs for the final evaluation")
    # model
    layers: int = C.arg(12, "Transformer layers")
    width: int = C.arg(384, "model width (paper: 784 for G(20,5))")
    heads: int = C.arg(8, "attention heads")
    positions: str = C.arg("learned", "positional encoding (learned as B&N; see docstring for sinusoidal)",
                           ["learned", "sinusoidal"])
    # optimisation
    steps: int = C.arg(6000, "optimizer steps per mode")
    batch_size: int = C.arg(256, "examples per step")
    lr: float = C.arg(1e-4, "peak learning rate (paper 1e-4)")
    warmup: int = C.arg(200, "linear warmup steps")
    weight_decay: float = C.arg(0.01, "AdamW weight decay")
    embed_lr_mult: float = C.arg(1.0, "token-embedding (tied head) LR = this x --lr (B&N: 1; the in-weights "
                                 "scripts use 30: rerun next-token with it to check the failure is not slow learning)")
    # evaluation
    eval_every: int = C.arg(250, "steps between evaluations on the held-out subset")
    eval_examples: int = C.arg(2000, "held-out graphs used for the curves (the final numbers use all n_test)")
    reverse_threshold: float = C.arg(0.95, "reverse exact match needed for the verdict")


QUICK = dict(num_nodes=20, n_train=2000, n_test=200, layers=1, width=32, heads=2, steps=40, batch_size=32,
             lr=3e-3, warmup=10, eval_every=20, eval_examples=100)


# CPU scale: a 2-layer model learns the reverse target and the Clever-Hans fit of next-token training
# within ~500-650 steps of batch 64 with a 10x embedding LR (1x had not left the copying stage by 750);
# 1,000 steps of 48 leave room for slower seeds (800 of 64 left seed 2's first hop an arm in 0.986 < 0.99).
SMALL = dict(num_nodes=20, n_train=50000, n_test=1000, layers=2, width=128, heads=4, steps=1000, batch_size=48,
             lr=1e-3, embed_lr_mult=10.0, warmup=100, eval_every=250, eval_examples=300)


def parse_modes(text: str) -> list[str]:
    return list(MODES) if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]


def validate(cfg: Config) -> str | None:
    modes = parse_modes(cfg.mode)
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        return f"--mode: unknown mode(s) {bad or cfg.mode!r}; choose from {', '.join(MODES)} or 'all'"
    if len(set(modes)) != len(modes):
        return f"--mode lists a mode twice: {cfg.mode!r}"
    if cfg.degree < 2:
        return f"--degree must be >= 2 (got {cfg.degree})"
    if cfg.path_length < 3:
        return f"--path-length must be >= 3 so the first hop is not the goal (got {cfg.path_length})"
    if cfg.num_nodes < cfg.degree * (cfg.path_length - 1) + 1:
        return (f"--num-nodes {cfg.num_nodes} cannot label G({cfg.degree},{cfg.path_length}): "
                f"need N >= d(l-1)+1 = {cfg.degree * (cfg.path_length - 1) + 1}")
    for name in ("n_train", "n_test", "layers", "width", "heads", "steps", "batch_size", "eval_every", "eval_examples"):
        if getattr(cfg, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})"
    if cfg.width % cfg.heads:
        return f"--width {cfg.width} is not divisible by --heads {cfg.heads}"
    if cfg.lr <= 0 or not cfg.embed_lr_mult > 0 or cfg.warmup < 0 or cfg.weight_decay < 0:
        return "--lr and --embed-lr-mult must be > 0 and --warmup, --weight-decay >= 0"
    if not 0 < cfg.reverse_threshold <= 1:
        return "--reverse-threshold must be in (0, 1]"
    return None


# ---------------------------------------------------------------------------- CLAIM LOGIC: data
def sample_in_context_graphs(n: int, d: int, l: int, N: int, rng: np.random.Generator):
    """n fresh path-stars G(d, l) in B&N's prompt layout, vectorised over examples.

    Returns (prefix (n, 3E+3), path (n, l)) with E = d(l-1) edges:
    prefix = u v | u v | ... u v / source goal =   (the edge list shuffled per example),
    path   = source a1 ... goal                      (goal = leaf of a random arm)."""
    E = d * (l - 1)
    labels = rng.permuted(np.tile(np.arange(N), (n, 1)), axis=1)[:, : E + 1]  # (n, E+1) distinct per row
    source, arms = labels[:, 0], labels[:, 1:].reshape(n, d, l - 1)  # arms[:, j] = a1 ... leaf of arm j
    tails = np.concatenate([np.repeat(source[:, None, None], d, 1), arms[:, :, :-1]], 2)  # (n, d, l-1)
    edges = np.stack([tails, arms], -1).reshape(n, E, 2)  # (n, E, 2) parent -> child
    order = np.argsort(rng.random((n, E)), 1)  # shuffle each edge list (an ordered list is a shortcut)
    edges = np.take_along_axis(edges, order[:, :, None], 1)
    body = np.concatenate([edges, np.full((n, E, 1), C.special("|", N))], 2).reshape(n, 3 * E)
    body[:, -1] = C.special("/", N)  # the last edge is followed by "/" instead of "|"
    goal_arm = rng.integers(0, d, n)
    path = np.concatenate([source[:, None], arms[np.arange(n), goal_arm]], 1)  # (n, l)
    prefix = np.concatenate([body, source[:, None], path[:, -1:], np.full((n, 1), C.special("=", N))], 1)
    return prefix.astype(np.int64), path.astype(np.int64)


def mode_answers(mode: str, path: np.ndarray) -> tuple[np.ndarray, int]:
    """The target tokens of a mode and the index of the first hop a1 among them."""
    l = path.shape[1]
    return {"next-token": (path, 1), "teacherless": (path, 1), "reverse": (path[:, ::-1], l - 2),
            "first-token": (path[:, 1:2], 0)}[mode]


def make_mode_set(mode: str, prefix, path, N: int, device, name: str) -> tuple[C.TokenSet, int]:
    answers, a1_index = mode_answers(mode, path)
    answers = np.ascontiguousarray(answers)
    hide = C.special("$", N) if mode == "teacherless" else None  # teacherless: inputs at target slots are `$`
    return C.make_token_set(f"{name}_{mode}", prefix, answers, device, hide_answers_with=hide), a1_index


# ---------------------------------------------------------------------------- CLAIM LOGIC: metrics
def is_source_child(prefix: torch.Tensor, token: torch.Tensor, n_edges: int) -> torch.Tensor:
    """(n,) bool: `token` is a child of the source in each prompt's edge list (an arm, right or wrong).
    Prompt layout: u v | u v | ... u v / source goal =  (3 tokens per edge, then source at 3E)."""
    u, v = prefix[:, 0: 3 * n_edges: 3], prefix[:, 1: 3 * n_edges: 3]  # (n, E)
    source = prefix[:, 3 * n_edges]  # (n,)
    return ((u == source[:, None]) & (v == token[:, None])).any(1)


@torch.no_grad()
def evaluate_set(model, ts: C.TokenSet, teacherless: bool, a1_index: int, n_edges: int) -> dict:
    """Greedy exact match, first-hop accuracy, and per-position accuracy both free-running (gen) and
    teacher-forced (tf): the gap between the two is the Clever Hans cheat. first_hop_valid = the
    greedy first hop is one of the source's children (the model picks an arm: "at chance" means a
    guess among the d arms, not garbage); tf_other = teacher-forced accuracy on every answer token
    but a1 (what next-token training can fit without planning)."""
    out = C.sequence_metrics(model, ts, "", teacherless, keep_generated=True)
    tf = (out["teacher_forced"] == ts.labels).double()  # (n, A), float64: see C.sequence_metrics
    other = [i for i in range(tf.shape[1]) if i != a1_index]
    valid = is_source_child(ts.inputs, out["generated"][:, a1_index], n_edges)
    return {"exact": out["exact"], "first_hop": out["per_position"][a1_index], "tf_token": out["tf_token"],
            "tf_first_hop": out["tf_per_position"][a1_index], "gen_per_position": out["per_position"],
            "tf_per_position": out["tf_per_position"], "first_hop_valid": valid.double().mean().item(),
            "tf_other": tf[:, other].mean().item() if other else None}


def learned_order(history: list[dict], key: str, threshold: float = 0.9) -> list:
    """Step at which each target position first reaches `threshold` accuracy (None if never)."""
    n = len(history[0][key])
    return [next((h["step"] for h in history if h[key][i] >= threshold), None) for i in range(n)]


def right_to_left(steps: list) -> bool:
    """The positions that were learned, learned from the last to the first, not all at one evaluation (a cascade)."""
    learned = [s for s in steps if s is not None]
    return len(learned) >= 2 and learned == sorted(learned, reverse=True) and learned[0] > learned[-1]


def train_mode(cfg: Config, mode: str, data: dict, device: str) -> tuple[dict, list]:
    N, d = cfg.num_nodes, cfg.degree
    E = d * (cfg.path_length - 1)  # edges per prompt
    train_set, a1 = make_mode_set(mode, data["train_prefix"], data["train_path"], N, device, "train")
    test_set, _ = make_mode_set(mode, data["test_prefix"], data["test_path"], N, device, "test")
    curve_set = C.TokenSet("curve", *(t[: cfg.eval_examples] for t in (test_set.inputs, test_set.targets)),
                           test_set.loss_pos)
    fit_set = C.TokenSet("fit", *(t[: cfg.eval_examples] for t in (train_set.inputs, train_set.targets)),
                         train_set.loss_pos)
    C.set_seed(cfg.seed)  # every mode starts from the same initialisation
    model = C.build_model("gpt", C.vocab_size(N), cfg.layers, cfg.width, cfg.heads, device,
                          block_size=data["train_prefix"].shape[1] + cfg.path_length,  # one size for every mode:
                          positions=cfg.positions)  # the same initialisation whatever the target length
    tc = C.TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup,
                       weight_decay=cfg.weight_decay, embed_lr_mult=cfg.embed_lr_mult, eval_every=cfg.eval_every,
                       compile=cfg.compile, compile_mode=cfg.compile_mode)
    teacherless = mode == "teacherless"
    print(f"[{mode}] G({d},{cfg.path_length}) N={N}: {len(train_set)} train / {len(test_set)} test graphs, "
          f"sequence {train_set.inputs.shape[1]} tokens, {C.count_params(model)['total']:,} parameters")

    def evaluate():
        r = {f"test_{k}": v for k, v in evaluate_set(model, curve_set, teacherless, a1, E).items()}
        r["train_first_hop"] = evaluate_set(model, fit_set, teacherless, a1, E)["first_hop"]
        return r

    modes = parse_modes(cfg.mode)
    if mode == modes[0]:  # the first mode: one estimate for the whole run
        C.cpu_time_check(SCRIPT, model, [train_set], dataclasses.replace(tc, steps=len(modes) * tc.steps), device,
                         CPU_COMMAND)
    history = C.train(model, [train_set], tc, device, cfg.seed, evaluate=evaluate,
                      log=lambda s: print(f"[{mode}] {s}"))
    model.eval()
    with torch.no_grad(), C.autocast(device):
        final = evaluate_set(model, test_set, teacherless, a1, E)
        fit = evaluate_set(model, fit_set, teacherless, a1, E)
        final.update(train_first_hop=fit["first_hop"], train_tf_other=fit["tf_other"], test_examples=len(test_set))
    final["train_seconds"] = history[-1]["train_seconds"]
    final.update(C.training_speed(model, [train_set], cfg.batch_size, cfg.steps, final["train_seconds"]))
    final["learned_step_per_position"] = learned_order(history, "test_gen_per_position")
    for h in history:
        h["mode"] = mode
    return final, history


# ---------------------------------------------------------------------------- figures and verdict
def plot(per_mode: dict, histories: dict, cfg: Config, out: str) -> list[str]:
    import matplotlib.pyplot as plt
    chance = 1 / cfg.degree
    cascade_modes = [m for m in ("teacherless", "next-token") if m in histories]
    fig, axes = plt.subplots(1, 2 + len(cascade_modes), figsize=(4.6 * (2 + len(cascade_modes)), 3.6))
    for mode, hist in histories.items():
        steps = [h["step"] for h in hist]
        axes[0].plot(steps, [h["test_first_hop"] for h in hist], label=mode)
        axes[1].plot(steps, [h["test_exact"] for h in hist], label=mode)
    for ax, title in zip(axes[:2], ["held-out first-hop a1 accuracy", "held-out exact match (greedy)"]):
        ax.axhline(chance, color="gray", ls="--", lw=1, label=f"chance 1/d = {chance:.2f}")
        ax.set(title=title, xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=7)
    names = ["source"] + [f"a{i}" for i in range(1, cfg.path_length - 1)] + ["goal"]
    for ax, mode in zip(axes[2:], cascade_modes):
        key = "test_gen_per_position" if mode == "teacherless" else "test_tf_per_position"
        hist = histories[mode]
        acc = np.array([h[key] for h in hist])  # (evals, l)
        for i in range(acc.shape[1]):
            ax.plot([h["step"] for h in hist], acc[:, i], label=names[i], color=plt.cm.viridis(i / max(1, acc.shape[1] - 1)))
        ax.set(title=f"{mode}: per-position ({'one pass' if mode == 'teacherless' else 'teacher-forced'})",
               xlabel="step", ylabel="held-out accuracy", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    fig.suptitle(f"In-context path-star G({cfg.degree},{cfg.path_length}), N={cfg.num_nodes}, "
                 f"{cfg.layers}x{cfg.width}, {cfg.steps} steps per mode", fontsize=10)
    fig.tight_layout()
    return C.save_figure(fig, out, SCRIPT)


def compute_verdict(per_mode: dict, cfg: Config) -> dict:
    """Next-token (and first-token) training fails: the held-out first hop inside the two-sided
    binomial chance band of 1/d, while the model did learn what it can (next-token: every other
    answer token teacher-forced on training graphs; both: the first hop is one of the source's
    children, i.e. a guess among the arms). Reverse is learned: exact match >= --reverse-threshold."""
    chance = 1 / cfg.degree
    nt, rev = per_mode.get("next-token"), per_mode.get("reverse")
    failing = "next-token" if nt is not None else "first-token" if "first-token" in per_mode else None
    fail_v = None
    if failing:
        r = per_mode[failing]
        learned = {f"{failing} held-out first hop is an arm": r["first_hop_valid"]}
        if failing == "next-token":
            learned["next-token train tokens but a1 (teacher-forced)"] = r["train_tf_other"]
        fail_v = C.failure_verdict(r["first_hop"], r["test_examples"], chance, learned, f"{failing} first hop a1")
    if rev is None and fail_v is None:  # teacherless alone: the paper makes no pass/fail claim
        v = C.no_claim("teacherless alone: the paper reports its right-to-left cascade, no pass/fail claim")
        return v
    if rev is None:
        return fail_v
    rev_ok = rev["exact"] >= cfg.reverse_threshold
    if fail_v is None:
        return C.verdict(rev["exact"], cfg.reverse_threshold, f"reverse held-out exact match >= {cfg.reverse_threshold}")
    v = C.verdict(rev["exact"], cfg.reverse_threshold, f"reverse held-out exact match >= {cfg.reverse_threshold} and "
                  + fail_v["criterion"])
    v.update(reproduced=bool(rev_ok and fail_v["reproduced"]), failure_half=fail_v,
             **{f"{failing}_first_hop": per_mode[failing]["first_hop"]}, chance=chance)
    if not v["reproduced"]:
        v["why_not"] = fail_v.get("why_not") or f"reverse exact {rev['exact']:.4f} < {cfg.reverse_threshold}"
    return v


def run(cfg: Config) -> dict:
    device, out = C.setup_run(cfg, SCRIPT)
    start = time.time()
    modes = parse_modes(cfg.mode)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    train_prefix, train_path = sample_in_context_graphs(cfg.n_train, cfg.degree, cfg.path_length, cfg.num_nodes, rng)
    test_prefix, test_path = sample_in_context_graphs(cfg.n_test, cfg.degree, cfg.path_length, cfg.num_nodes, rng)
    data = dict(train_prefix=train_prefix, train_path=train_path, test_prefix=test_prefix, test_path=test_path)
    print(f"sampled {cfg.n_train + cfg.n_test} graphs in {time.time() - t0:.1f}s; "
          f"prompt {train_prefix.shape[1]} tokens, target {cfg.path_length}")
    per_mode, histories = {}, {}
    for mode in modes:
        per_mode[mode], histories[mode] = train_mode(cfg, mode, data, device)
    chance = 1 / cfg.degree
    metrics = {"chance_first_hop": chance, "per_mode": per_mode}
    for mode, r in per_mode.items():  # flat summary keys for the README table
        metrics[f"{mode}/test_exact"], metrics[f"{mode}/test_first_hop"] = r["exact"], r["first_hop"]
    if "teacherless" in per_mode:  # right-to-left cascade: a_{l-2} reaches 90% before ... before a1
        metrics["teacherless_cascade_right_to_left"] = right_to_left(per_mode["teacherless"]["learned_step_per_position"][1:-1])
    figures = plot(per_mode, histories, cfg, out)
    history = [h for mode in modes for h in histories[mode]]
    return C.write_results(out, SCRIPT, "App. A / Fig 13, Fig 34 right: in-context path-star, next-token fails, reverse learned",
                           cfg, device, time.time() - start, metrics, history, compute_verdict(per_mode, cfg),
                           figures=figures, modes=modes, precision=C.run_precision(device))  # argmax metrics: bf16 safe


def main():
    cfg = C.cli(Config, __doc__.split("\n")[0], QUICK, validate, small=SMALL)
    run(cfg)


if __name__ == "__main__":
    main()
