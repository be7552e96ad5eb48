"""Tiny graphs: sequence models memorize edges as a geometry although an associative lookup is faster to find.

Claim (paper §3.2, §4.1, App. C.3, C.3.1; Figs 1, 6, 7, 17-32; claims.md Obs 3.2a/b, Fig 6, Conj 1).
Trained on edges only (`[EDGE] u -> v`, both directions, full batch, fp32 on every device) on path-star
G(4,5) (17 nodes), the 4x4 grid, the 15-cycle and the 16-node irregular graph (nodes 12-15: a separate K4):
  associative       1 trainable D x D matrix between frozen tied (un)embeddings: storage is a lookup
  associative-fast  the same at width 512, LR 0.1: memorizes in 1-2 steps
  nn                the same with trainable embeddings (TinyNN)
  transformer       1 layer, 1 head, width 32, learned positions (as the release)
  mamba             1 layer, width 32, d_state 8, d_conv 4, expand 2 (paper v1 TinySSM)
  node2vec          V V^T, width 100, plain gradient descent, LR 0.01, 10,000 steps (see node2vec_spectral.py)
Expected: all reach 100% top-k recovery; associative margins < 0 < NN and Transformer margins; width-512 associative
memorizes in <= 3 steps, NN and Transformer need >= 10 steps to memorize and for their geometric level to settle;
Node2Vec puts the most embedding energy on the top (Fiedler-like) eigenvectors. A margin's sign on a 16-node graph can
flip with the seed, so each (graph, model) trains once per seed (--seeds) and a sign check passes when at least
--majority of the seeds (default 0.8: 4 of 5) have the expected sign, on every graph; Mamba, associative-fast and
Node2Vec signs are reported, not checked (the paper claims nothing).
`--study regularizers` runs App. C.3.1: TinyNN (width 512), 15-cycle, 10,000 steps, self-edges, GPT vs unit init,
LR, weight decay 10, dropout 0.4; a setting passes when >= --majority of the seeds give the release's sign. README 10-13.

Geometric margin (B.5 item 4), one definition for every tied model: L = the model's own logits over the
node columns after `[EDGE] u` (row u), E = the node embeddings; skewed logits = U diag(U^T L U) U^T, U the
left-singular vectors of E (common.skew_logits); margin = mean over nodes of (max logit over neighbours -
max over the other nodes), self in neither set. For a bias-free middle matrix (L = E W^T E^T) this is the
paper's W -> Vh^T diag(Vh W Vh^T) Vh exactly. Why the logits: with N <= m a bias folds into the matrix
with the same logits, so skewing W with the bias kept apart (the old definition) can move (+0.11 and -0.35
for one path-star Transformer under two such fits); a function of (E, L) cannot (README). Node2Vec's
L = V V^T is its own skew; untied models get no margin. Reported, labelled, never in a verdict:
margin_skewed_bias_apart (the old definition; Transformer / Mamba: W, b = the min-norm affine fit
H ~ E W^T + b to the final hidden states) and margin_skewed_release_style (E W E^T, no bias, whole vocabulary).

Commands
    python tiny_graphs.py --quick                  # CPU smoke test (cycle, seeds 0,1), ~30 s
    python tiny_graphs.py                          # 4 graphs x 6 archs x 5 seeds, 10-15 min on 1 CPU core
    OMP_NUM_THREADS=1 python tiny_graphs.py --small   # seeds 0,1,2 without Mamba, ~2.5 min (--seeds 0: one seed)
    python tiny_graphs.py --forward-only --arch transformer     # Fig 32 (--self-edges: Fig 25; --untied: §4.4)
    python tiny_graphs.py --study regularizers     # App. C.3.1, ~5 min per seed on 2 CPU cores
Outputs in --out (default runs/tiny_graphs[_regularizers]/), figures of the first seed: results.json;
fig1_summary.png (graphs x associative / Transformer / Node2Vec, top-3 PCA); arch_<name>.png (PCA, cosine
heatmap, adjacency, top-k and geometric level over steps, Laplacian projections); fig6_speed.png.

Settings and metrics (differences from the release)
  - The release notebooks' settings (release_repo_facts.md §5.2, also --self-edges / --forward-only), seeds
    0-4 (release: 7); AdamW, no weight decay or warmup, "decay" = cosine to LR/10. Associative irregular:
    1,000 steps (500 left a node short of 100%); associative-fast: constant LR, no weight decay; associative
    cycle: no positional encoding (the release left a frozen random one on); Mamba: v1 width 32 everywhere.
  - Top-k recovery = common.edge_metrics (k = out-degree); Node2Vec: over the N nodes, self excluded unless
    --self-edges (release: top-5). Geometric level = mean cosine over the training pairs (self-edges too).
  - Top-few fraction = share of the embedding energy on the Laplacian eigenvectors ((D^-1 A - I) + its
    transpose, App. F; component-constant ones excluded) in the top --band of the eigenvalue range.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

import common as C

SCRIPT = "tiny_graphs"
GRAPHS = ["path_star", "grid", "cycle", "irregular"]
ARCHS = ["associative", "associative-fast", "nn", "transformer", "mamba", "node2vec"]
ONE_MATRIX = ("associative", "associative-fast", "nn")

# (width, peak LR, steps, schedule) per architecture and graph: the release notebooks (§5.2)
_T = {"path_star": (32, 0.01, 500, "cosine"), "grid": (32, 0.01, 500, "cosine"), "cycle": (32, 0.01, 700, "cosine"),
      "irregular": (32, 0.01, 2500, "cosine")}
SETTINGS = {
    "associative": {"path_star": (32, 0.2, 500, "cosine"), "grid": (32, 0.2, 500, "cosine"),
                    "cycle": (15, 10.0, 5000, "cosine"), "irregular": (16, 2.0, 1000, "cosine")},
    "associative-fast": {g: (512, 0.1, 10, "constant") for g in GRAPHS},
    "nn": {"path_star": (32, 0.01, 500, "cosine"), "grid": (32, 0.01, 500, "cosine"),
           "cycle": (512, 0.01, 10000, "constant"), "irregular": (16, 0.005, 1000, "cosine")},
    "transformer": _T, "mamba": dict(_T),
    "node2vec": {g: (100, 0.01, 10000, "gd") for g in GRAPHS},
}
SELF_EDGE_SETTINGS = {  # the release's self-edge notebooks
    "associative": {"path_star": (32, 1.0, 200, "cosine"), "grid": (16, 15.0, 200, "cosine"),
                    "cycle": (15, 5.0, 200, "cosine"), "irregular": (64, 0.5, 200, "constant")},
    "nn": {"path_star": (32, 0.05, 200, "cosine"), "grid": (16, 0.1, 200, "cosine"),
           "cycle": (512, 0.01, 10000, "constant"), "irregular": (64, 0.05, 200, "constant")},
    "transformer": {"irregular": (48, 0.01, 2000, "cosine")},
}
FORWARD_ONLY_SETTINGS = {"transformer": {"grid": (32, 0.01, 1000, "cosine"), "irregular": (48, 0.01, 2000, "cosine")}}
# App. C.3.1 on the 15-cycle, TinyNN width 512, 10k steps: (name, init, LR, schedule, weight decay, dropout,
# self-edges, the release's printed skewed margin)
REGULARIZERS = [("self_edges", "gpt", 1e-2, "constant", 0.0, 0.0, True, 6.882),
                ("gpt_init_lr1e-2", "gpt", 1e-2, "constant", 0.0, 0.0, False, 7.871),
                ("gpt_init_lr1e-4", "gpt", 1e-4, "constant", 0.0, 0.0, False, 3.416),
                ("unit_init_lr1e-4", "unit", 1e-4, "constant", 0.0, 0.0, False, -0.749),
                ("unit_init_lr1e-1_decay", "unit", 1e-1, "cosine", 0.0, 0.0, False, 11.992),
                ("unit_init_lr1e-4_wd10", "unit", 1e-4, "constant", 10.0, 0.0, False, 2.968),
                ("unit_init_lr1e-3_dropout0.4", "unit", 1e-3, "constant", 0.0, 0.4, False, 9.033)]


@dataclass
class Config:
    seed: int = C.arg(0, "base seed (path-star labels, init, data order); each run uses --seed + an offset of --seeds")
    seeds: str = C.arg("0,1,2,3,4", "seed offsets: each (graph, arch) trains once at --seed + each; sign checks count them")
    majority: float = C.arg(0.8, "a margin-sign check passes when >= this fraction of the seeds has its sign (4 of 5)")
    device: str = C.arg("auto", "auto = cuda if available, else cpu", ["auto", "cpu", "cuda"])
    out: str = C.arg("", "output folder (default runs/tiny_graphs/ or runs/tiny_graphs_regularizers/)")
    quick: bool = C.arg(False, "smoke configuration (cycle only, 5 percent of the steps, seeds 0,1); not a reproduction")
    small: bool = C.arg(False, "the claim on a CPU in ~2.5 min: seeds 0,1,2 at a 2-of-3 sign rule, no Mamba")
    study: str = C.arg("architectures", "what to run: the architecture grid or the App. C.3.1 study",
                       ["architectures", "regularizers"])
    graphs: str = C.arg(",".join(GRAPHS), f"comma-separated graphs from {GRAPHS}")
    forward_only: bool = C.arg(False, "train on forward edges only (Fig 32)")
    self_edges: bool = C.arg(False, "add a (u, u) example per node (Fig 25; release self-edge settings)")
    arch: str = C.arg(",".join(ARCHS), f"comma-separated architectures from {ARCHS}")
    untied: bool = C.arg(False, "untie the (un)embeddings (zigzag, §4.4); no margin is computed")
    steps_scale: float = C.arg(1.0, "multiply every run's step budget (quick mode: 0.05)")
    eval_points: int = C.arg(200, "evaluations per run for the memorization / geometry curves")
    band: float = C.arg(0.1, "top few = non-trivial eigenvectors in the top band of the eigenvalue range")


QUICK = dict(graphs="cycle", steps_scale=0.05, eval_points=10, seeds="0,1")
# Full budgets, 3 seeds at 2 of 3 (0.8 would ask 3 of 3), no Mamba (unchecked), curves read every steps/50
SMALL = dict(arch="associative,associative-fast,nn,transformer,node2vec", seeds="0,1,2", majority=0.66, eval_points=50)
# Expected sign of the skewed margin per family; only SIGN_CHECKED enter the verdict (the paper's claim).
EXPECTED_SIGN = {"associative": -1, "associative-fast": -1, "nn": 1, "transformer": 1, "mamba": 1, "node2vec": 1}
SIGN_CHECKED = ("associative", "nn", "transformer")


def seed_list(cfg: Config) -> list[int]:
    return [cfg.seed + int(s) for s in cfg.seeds.split(",")]


def validate(cfg: Config) -> str | None:
    for flag, names, known in (("graphs", cfg.graphs.split(","), GRAPHS), ("arch", cfg.arch.split(","), ARCHS)):
        if not all(n in known for n in names):
            return f"--{flag}: unknown {[n for n in names if n not in known]}; choose from {known}"
    if not 0 < cfg.steps_scale <= 100:
        return f"--steps-scale must lie in (0, 100] (got {cfg.steps_scale})"
    if cfg.eval_points < 2 or not 0 < cfg.band < 1:
        return "--eval-points must be >= 2 and --band in (0, 1)"
    offsets = cfg.seeds.split(",")
    if not all(re.fullmatch(r"[0-9]+", o.strip()) for o in offsets) or len(set(map(int, offsets))) != len(offsets):
        return f"--seeds must be distinct integers >= 0 separated by commas, e.g. 0,1,2 (got {cfg.seeds!r})"
    if max(seed_list(cfg)) > C.MAX_SEED:
        return f"--seed + the largest --seeds offset must be <= {C.MAX_SEED} (got {max(seed_list(cfg))})"
    if not 0 < cfg.majority <= 1:
        return f"--majority must lie in (0, 1] (got {cfg.majority})"
    if cfg.study == "regularizers" and cfg.untied:  # the study compares margins, which an untied model has none of
        return "--study regularizers compares margin signs: an --untied model has no margin"
    return None


def make_graph(name: str, seed: int) -> C.Graph:
    return {"path_star": lambda: C.path_star(4, 5, seed=seed), "grid": lambda: C.grid_graph(4, 4, 5, seed),
            "cycle": lambda: C.cycle_graph(15, 5, seed), "irregular": lambda: C.irregular_graph(5, seed)}[name]()


def settings(arch: str, graph: str, cfg: Config):
    s = SETTINGS[arch][graph]
    if cfg.self_edges:
        s = SELF_EDGE_SETTINGS.get(arch, {}).get(graph, s)
    if cfg.forward_only:
        s = FORWARD_ONLY_SETTINGS.get(arch, {}).get(graph, s)
    width, lr, steps, schedule = s
    return width, lr, max(2, round(steps * cfg.steps_scale)), schedule


def build(arch: str, vocab: int, width: int, device, tied: bool, init="gpt", dropout=0.0):
    lookup = dict(attention=False, residual=False, layernorm=False, mlp="linear", positions="none")
    if arch in ONE_MATRIX:
        return C.build_model("gpt", vocab, 1, width, 1, device, tied=tied, init=init, dropout=dropout,
                             freeze_embeddings=arch != "nn", **lookup)
    if arch == "transformer":
        return C.build_model("gpt", vocab, 1, width, 1, device, positions="learned", tied=tied)
    return C.build_model("mamba", vocab, 1, width, 1, device, d_state=8, d_conv=4, expand=2, tied=tied)


def geometry_step(curve: list[dict]) -> int | None:
    """First step at which the geometric level has moved 90% of its largest distance from step 0."""
    geo = np.array([r["geometric_level"] for r in curve])
    dev = np.abs(geo - geo[0])
    if dev.max() < 1e-3:  # frozen embeddings: no geometry ever forms
        return None
    return int(curve[int(np.argmax(dev >= 0.9 * dev.max()))]["step"])


def settle_step(curve: list[dict], tol: float = 0.05) -> int:
    """First step after which the geometric level stays within tol of its final value."""
    geo = np.array([r["geometric_level"] for r in curve])
    off = np.flatnonzero(np.abs(geo - geo[-1]) > tol)
    return int(curve[off[-1] + 1]["step"]) if len(off) else int(curve[0]["step"])


def analyse(run: dict, g: C.Graph, pairs, E, A, cfg: Config) -> None:
    """Spectral projections, energy fraction and curve summaries, added to run in place."""
    evals, evecs, trivial = C.laplacian_spectrum(A)
    proj = C.eigen_projections(E, evecs)
    run.update(projections=[round(float(p), 5) for p in proj], eigenvalues=[round(float(v), 5) for v in evals],
               trivial=[int(i) for i in np.flatnonzero(trivial)],
               spectral_top_fraction=C.spectral_energy_fraction(proj, evals, trivial, cfg.band),
               geometric_level=C.geometric_level(E, pairs))
    curve = run["curve"]
    run.update(first_step_topk_100=next((r["step"] for r in curve if r["edge_topk"] >= 0.999), None),
               geometry_step=geometry_step(curve), geometry_settle_step=settle_step(curve),
               geometric_level_peak=max(r["geometric_level"] for r in curve))


def train_sequence(arch: str, g: C.Graph, cfg: Config, device, init="gpt", dropout=0.0, lr=None, schedule=None,
                   weight_decay=0.0, steps=None, width=None) -> tuple[dict, np.ndarray]:
    direction = "forward" if cfg.forward_only else "both"
    w, l, s, sch = settings(arch, _key(g), cfg)
    width, lr, steps, schedule = width or w, lr or l, steps or s, schedule or sch
    C.set_seed(cfg.seed)
    N, vocab = g.num_nodes, C.vocab_size(g.num_nodes)
    model = build(arch, vocab, width, device, not cfg.untied, init, dropout)
    pairs = C.directed_edges(g, direction, cfg.self_edges)
    data = C.edge_examples(g, direction, cfg.self_edges, device)

    def evaluate():
        r = C.edge_metrics(model, g, direction, cfg.self_edges, device)
        r["geometric_level"] = C.geometric_level(C.token_embeddings(model, N), pairs)
        return r

    tc = C.TrainConfig(steps=steps, batch_size=0, lr=lr, warmup=0, schedule=schedule, weight_decay=weight_decay,
                       eval_every=max(1, steps // cfg.eval_points), precision="fp32")  # bf16 flips margin signs
    t0 = time.time()
    curve = C.train(model, [data], tc, device, cfg.seed, evaluate, log=lambda s: None)
    model.eval()
    E = C.token_embeddings(model, N)
    run = {"graph": _key(g), "arch": arch, "seed": cfg.seed, "width": width, "lr": lr, "steps": steps,
           "schedule": schedule, "edge_topk": curve[-1]["edge_topk"], "edge_top1_valid": curve[-1]["edge_top1_valid"],
           "curve": [{k: r[k] for k in ("step", "seconds", "edge_topk", "geometric_level")} for r in curve]}
    targets = C.neighbour_targets(pairs, N)
    if not cfg.untied:  # the margin of the model's own node logits: no choice of W and b can move it
        run.update(C.geometric_margin(E, C.edge_prompt_logits(model, N, device), targets))
        if arch in ONE_MATRIX:  # reported only: the real W of x -> x W^T + b skewed, b kept apart; the release's
            lin = model.blocks[0].mlp[0]
            W, b = lin.weight.detach().double().cpu().numpy(), lin.bias.detach().double().cpu().numpy()
            run["margin_skewed_bias_apart"] = C.geometric_margin_bias_apart(E, W, targets, b)["margin_skewed"]
            E_all = model.wte.weight.detach().double().cpu().numpy()  # whole vocabulary, W (not W^T), no bias
            run["margin_skewed_release_style"] = C.geometric_margin_bias_apart(E_all, W.T, targets)["margin_skewed"]
        else:  # reported only: the min-norm affine fit to the final hidden states, skewed with its b kept apart
            W, b, err = C.effective_middle(E, C.edge_prompt_hidden(model, N, device))
            run["margin_skewed_bias_apart"] = C.geometric_margin_bias_apart(E, W, targets, b)["margin_skewed"]
    analyse(run, g, pairs, E, g.adjacency(cfg.self_edges), cfg)
    run["seconds"] = round(time.time() - t0, 2)
    return run, E


def _key(g: C.Graph) -> str:
    return next(k for k in GRAPHS if g.name.startswith(k))


def train_node2vec(g: C.Graph, cfg: Config, device) -> tuple[dict, np.ndarray]:
    width, lr, steps, _ = settings("node2vec", _key(g), cfg)
    C.set_seed(cfg.seed)
    pairs = C.directed_edges(g, "forward" if cfg.forward_only else "both", cfg.self_edges)
    targets = C.neighbour_targets(pairs, g.num_nodes)
    model = C.Node2Vec(g.num_nodes, width, tied=not cfg.untied).to(device)

    def record(step):
        with torch.no_grad():
            logits = model.logits().cpu().numpy()
        E = model().detach().cpu().numpy()
        return {"edge_topk": C.topk_recovery(logits, targets, exclude_self=not cfg.self_edges),
                "geometric_level": C.geometric_level(E, pairs)}

    t0 = time.time()
    hist = C.train_node2vec(model, targets, steps, lr, max(1, steps // cfg.eval_points), record)
    E = model().detach().cpu().numpy()
    run = {"graph": _key(g), "arch": "node2vec", "seed": cfg.seed, "width": width, "lr": lr, "steps": steps,
           "schedule": "plain GD", "edge_topk": hist[-1]["edge_topk"], "final_loss": hist[-1]["loss"], "final_grad_norm": hist[-1]["grad_norm"],
           "curve": [{k: r[k] for k in ("step", "seconds", "edge_topk", "geometric_level")} for r in hist]}
    if not cfg.untied:  # L = V V^T is already diagonal in V's singular basis: skewed = original
        run.update(C.geometric_margin(E, E @ E.T, targets))
    analyse(run, g, pairs, E, g.adjacency(cfg.self_edges), cfg)
    run["seconds"] = round(time.time() - t0, 2)
    return run, E


# ------------------------------------------------------------------------------------------ figures
def node_order(g: C.Graph) -> np.ndarray:
    """Heatmap order: the path-star root, then each arm root -> leaf; identity otherwise."""
    if g.root is None:
        return np.arange(g.num_nodes)
    return np.concatenate([[g.root], g.paths[np.argsort(g.paths[:, 1])][:, 1:].ravel()])


def draw_curves(ax, curve: list[dict], title=""):
    steps = np.array([r["step"] for r in curve])
    ax.plot(steps, [100 * r["edge_topk"] for r in curve], color="tab:blue", label="top-k recovery (%)")
    ax.set_ylim(-5, 105), ax.set_ylabel("top-k (%)", fontsize=7, color="tab:blue"), ax.set_xlabel("step", fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["geometric_level"] for r in curve], color="tab:red", label="geometric level")
    ax2.set_ylim(-1.05, 1.05), ax2.set_ylabel("geometric level", fontsize=7, color="tab:red"), ax2.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8), ax.tick_params(labelsize=6)


def margin_text(run: dict) -> str:
    return f"{run['margin_skewed']:+.3f}" if run.get("margin_skewed") is not None else "n/a"


def figure_arch(arch, runs, graphs, embeddings, cfg, out):
    fig = C.plt.figure(figsize=(18, 3.3 * len(runs)))
    for i, run in enumerate(runs):
        g, E = graphs[run["graph"]], embeddings[(run["graph"], arch)]
        ax = fig.add_subplot(len(runs), 5, 5 * i + 1, projection="3d")
        C.draw_graph_3d(ax, C.pca_coords(E), g.edges, f"{run['graph']}: PCA of node embeddings", g.root)
        order = node_order(g)
        cos = C.cosine_matrix(E[order])
        np.fill_diagonal(cos, np.nan)
        ax = fig.add_subplot(len(runs), 5, 5 * i + 2)
        ax.imshow(cos, cmap="plasma"), ax.set_title("node cosine similarity", fontsize=8), ax.axis("off")
        A = g.adjacency(cfg.self_edges)[np.ix_(order, order)]
        ax = fig.add_subplot(len(runs), 5, 5 * i + 3)
        ax.imshow(A, cmap="plasma"), ax.set_title("adjacency (same order)", fontsize=8), ax.axis("off")
        draw_curves(fig.add_subplot(len(runs), 5, 5 * i + 4), run["curve"],
                    title=f"top-k {100 * run['edge_topk']:.0f}%, geometric level {run['geometric_level']:.2f}")
        ax = fig.add_subplot(len(runs), 5, 5 * i + 5)
        C.draw_projection_bars(ax, np.array(run["eigenvalues"]), np.array(run["projections"]),
                               np.isin(np.arange(g.num_nodes), run["trivial"]),
                               f"top-few energy {run['spectral_top_fraction']:.2f}, margin {margin_text(run)}")
    fig.suptitle(f"{arch}: edges only, {'forward' if cfg.forward_only else 'both directions'}"
                 f"{', self-edges' if cfg.self_edges else ''}{', untied' if cfg.untied else ''}", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, out, f"arch_{arch}", pdf=False)


def figure_summary(runs_by, graphs, embeddings, out):
    cols, names = [a for a in ("associative", "transformer", "node2vec") if any(k[1] == a for k in embeddings)], list(graphs)
    if not cols:
        return
    fig = C.plt.figure(figsize=(3.6 * len(cols), 3.3 * len(names)))
    for i, gname in enumerate(names):
        for j, arch in enumerate(cols):
            run, g = runs_by[(gname, arch)], graphs[gname]
            ax = fig.add_subplot(len(names), len(cols), i * len(cols) + j + 1, projection="3d")
            C.draw_graph_3d(ax, C.pca_coords(embeddings[(gname, arch)]), g.edges, f"{gname} / {arch}\nmargin "
                            f"{margin_text(run)}, top-few energy {run['spectral_top_fraction']:.2f}", g.root)
    fig.suptitle("Fig 1 layout: associative (no geometry) vs Transformer vs Node2Vec (top-3 PCA)", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, out, "fig1_summary")


def figure_speed(runs, names, out):
    fig, axes = C.plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    colors = dict(zip(ARCHS, ["tab:gray", "black", "tab:green", "tab:blue", "tab:purple", "tab:orange"]))
    for ax, gname in zip(axes[0], names):
        ax2 = ax.twinx()
        for run in [r for r in runs if r["graph"] == gname]:
            steps = np.array([r["step"] for r in run["curve"]]) + 1
            ax.plot(steps, [100 * r["edge_topk"] for r in run["curve"]], color=colors[run["arch"]], label=run["arch"])
            ax2.plot(steps, [r["geometric_level"] for r in run["curve"]], color=colors[run["arch"]], ls="--")
        ax.set_xscale("log"), ax.set_xlabel("step + 1", fontsize=8), ax.set_ylabel("top-k recovery (%, solid)", fontsize=8)
        ax2.set_ylabel("geometric level (dashed)", fontsize=8), ax2.set_ylim(-1.05, 1.05), ax.set_title(gname, fontsize=9)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle("Figs 6, 21-22: associative storage is found in a few steps, geometry takes longer", fontsize=10)
    fig.tight_layout()
    C.save_figure(fig, out, "fig6_speed", pdf=False)


# ------------------------------------------------------------------------------------------ verdicts
def sign_fractions(runs: list[dict], expected: dict) -> dict:
    """Per group (graph/arch, or regularizer setting): the skewed margins over the seeds and the
    fraction of seeds whose sign is the expected one; expected maps a run to +1 / -1."""
    groups = {}
    for r in (r for r in runs if r.get("margin_skewed") is not None):
        groups.setdefault(r.get("setting") or f"{r['graph']}/{r['arch']}", []).append(r)
    return {name: {"expected_sign": "+" if expected(rs[0]) > 0 else "-", "seeds": [r["seed"] for r in rs],
                   "margins_skewed": [round(r["margin_skewed"], 4) for r in rs],
                   "fraction_expected_sign": float(np.mean([np.sign(r["margin_skewed"]) == expected(r) for r in rs]))}
            for name, rs in groups.items()}


def print_fractions(fractions: dict, majority: float) -> None:
    for name, f in fractions.items():
        print(f"[signs] {name:28s} expected {f['expected_sign']} | margins "
              f"{' '.join(f'{m:+.2f}' for m in f['margins_skewed'])} | fraction {f['fraction_expected_sign']:.2f} "
              f"{'>=' if f['fraction_expected_sign'] >= majority else '<'} {majority}", flush=True)


CLAIM_PARTS = {"all_runs_memorize": "every model memorizes the edges (100% top-k)", "associative_margin": "associative margin < 0",
               "nn_margin": "TinyNN margin > 0", "transformer_margin": "Transformer margin > 0", "associative_fast": "associative "
               "storage found in <= 3 steps, geometry in >= 10", "node2vec_sharpest": "Node2Vec's geometry the sharpest"}


def architecture_checks(runs: list[dict], fractions: dict, majority: float) -> dict:
    by = lambda arch: [r for r in runs if r["arch"] == arch]  # noqa: E731
    checks = {"all_runs_memorize_100pct_topk": all(r["edge_topk"] >= 0.999 for r in runs)}
    for arch in SIGN_CHECKED:  # on every graph, a majority of the seeds has the expected sign
        fr = [f["fraction_expected_sign"] for k, f in fractions.items() if k.split("/")[1] == arch]
        if fr:
            sign = "negative" if EXPECTED_SIGN[arch] < 0 else "positive"
            checks[f"{arch}_margin_{sign}_in_ge_{majority}_of_seeds"] = all(x >= majority for x in fr)
    if by("associative-fast") and (by("nn") or by("transformer")):
        fast = [r["first_step_topk_100"] for r in by("associative-fast")]
        slow = [s for r in by("nn") + by("transformer") for s in (r["first_step_topk_100"], r["geometry_settle_step"])]
        checks["associative_fast_le_3_steps_geometric_ge_10"] = (
            all(s is not None and s <= 3 for s in fast) and all(s is not None and s >= 10 for s in slow))
    if by("node2vec"):  # per graph and seed: Node2Vec's top-few share is high and above NN's and Transformer's
        top = {(r["graph"], r["seed"]): r["spectral_top_fraction"] for r in by("node2vec")}
        checks["node2vec_sharpest_top_fraction_ge_0.9"] = all(v >= 0.9 for v in top.values()) and all(
            r["spectral_top_fraction"] < top[(r["graph"], r["seed"])] for r in by("nn") + by("transformer"))
    return checks


def run_architectures(cfg: Config, device, out) -> tuple[list[dict], dict]:
    names, archs = cfg.graphs.split(","), cfg.arch.split(",")
    runs, graphs0, emb0, runs0 = [], {}, {}, {}  # the first seed's graphs, embeddings and runs: figures
    for seed in seed_list(cfg):
        sub = dataclasses.replace(cfg, seed=seed)
        graphs = {n: make_graph(n, seed) for n in names}
        for arch in archs:
            for n in names:
                r, E = (train_node2vec(graphs[n], sub, device) if arch == "node2vec"
                        else train_sequence(arch, graphs[n], sub, device))
                runs.append(r)
                if seed == seed_list(cfg)[0]:
                    graphs0[n], emb0[(n, arch)], runs0[(n, arch)] = graphs[n], E, r
                print(f"[{arch:16s} {n:9s} seed {seed}] top-k {r['edge_topk']:.3f} (100% at step {r['first_step_topk_100']}) "
                      f"| geo level {r['geometric_level']:+.3f} (moves by {r['geometry_step']}, settles by "
                      f"{r['geometry_settle_step']}) | margin {margin_text(r)} | top-few energy "
                      f"{r['spectral_top_fraction']:.3f} | {r['seconds']:.1f}s", flush=True)
    for arch in archs:
        figure_arch(arch, [runs0[(n, arch)] for n in names], graphs0, emb0, cfg, out)
    figure_summary(runs0, graphs0, emb0, out)
    figure_speed(list(runs0.values()), names, out)
    fractions = sign_fractions(runs, lambda r: EXPECTED_SIGN[r["arch"]])
    print_fractions(fractions, cfg.majority)
    return runs, {"margin_sign_fractions": fractions, "checks": architecture_checks(runs, fractions, cfg.majority)}


def run_regularizers(cfg: Config, device, out) -> tuple[list[dict], dict]:
    steps = max(2, round(10000 * cfg.steps_scale))
    runs, first = [], {}  # the first seed's graph, embeddings and run per setting: figures
    for seed in seed_list(cfg):
        g = C.cycle_graph(15, 5, seed)
        for name, init, lr, schedule, wd, dropout, self_edges, release in REGULARIZERS:
            sub = dataclasses.replace(cfg, seed=seed, self_edges=self_edges)
            run, E = train_sequence("nn", g, sub, device, init, dropout, lr, schedule, wd, steps, 512)
            run.update(setting=name, release_margin_skewed=release)
            runs.append(run), first.setdefault(name, (g, E, run))
            print(f"[{name} seed {seed}] top-k {run['edge_topk']:.3f} | margin skewed {run['margin_skewed']:+.3f} "
                  f"(release {release:+.3f}) | original {run['margin_original']:+.3f} | {run['seconds']:.0f}s", flush=True)
    fig = C.plt.figure(figsize=(11, 3.0 * len(first)))
    for i, (name, (g, E, run)) in enumerate(first.items()):
        ax = fig.add_subplot(len(first), 3, 3 * i + 1, projection="3d")
        C.draw_graph_3d(ax, C.pca_coords(E), g.edges, name)
        cos = C.cosine_matrix(E)
        np.fill_diagonal(cos, np.nan)
        ax = fig.add_subplot(len(first), 3, 3 * i + 2)
        ax.imshow(cos, cmap="plasma"), ax.axis("off"), ax.set_title("node cosine similarity", fontsize=8)
        C.draw_projection_bars(fig.add_subplot(len(first), 3, 3 * i + 3), np.array(run["eigenvalues"]),
                               np.array(run["projections"]), np.isin(np.arange(15), run["trivial"]),
                               f"geometric margin {run['margin_skewed']:+.2f} (release {run['release_margin_skewed']:+.2f})")
    fig.tight_layout()
    C.save_figure(fig, out, "regularizers_cycle", pdf=False)
    fractions = sign_fractions(runs, lambda r: np.sign(r["release_margin_skewed"]))
    print_fractions(fractions, cfg.majority)
    checks = {f"sign_agrees_{k}": f["fraction_expected_sign"] >= cfg.majority for k, f in fractions.items()}
    return runs, {"margin_sign_fractions": fractions, "checks": checks}


def run(cfg: Config) -> dict:
    if cfg.study == "regularizers" and not cfg.out:
        cfg = dataclasses.replace(cfg, out=f"runs/{SCRIPT}_regularizers")
    device, out = C.setup_run(cfg, SCRIPT, deterministic=True)  # same seed, same signs on a GPU; free at this size
    if device == "cpu":
        torch.set_num_threads(1)  # tensors of a few KB: threads only add overhead (and fight neighbours)
    else:  # true fp32: TF32 matmuls round like bf16's mantissa and can flip small margins too
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    start = time.time()
    if cfg.study == "regularizers":
        runs, res = run_regularizers(cfg, device, out)
        claim = "App. C.3.1: regularizers, init and LR shape TinyNN's geometry on the 15-cycle (margin signs)"
    else:
        runs, res = run_architectures(cfg, device, out)  # the claim names what this --arch / --untied selection checks
        claim = "§3.2/App. C.3/§4.1: tiny graphs: " + "; ".join(t for k, t in CLAIM_PARTS.items() if any(c.startswith(k) for c in res["checks"]))
    checks = res["checks"]
    verdict = C.verdict(sum(checks.values()), len(checks), f"checks passed over seeds {seed_list(cfg)} (a sign check: "
                        f">= {cfg.majority} of the seeds): " + ", ".join(f"{k}={v}" for k, v in checks.items()))
    if cfg.study != "regularizers" and len(checks) == 1:  # memorization alone: no margin, speed or spectral claim
        verdict = C.no_claim(f"no claim checked: {', '.join(checks)} only (--arch {cfg.arch}, untied {cfg.untied})")
    if cfg.quick:
        verdict["criterion"] += " (quick mode: smoke only, not a reproduction)"
    if verdict["reproduced"] is False:
        verdict["why_not"] = "failed: " + ", ".join(k for k, ok in checks.items() if not ok)
    history = [{"step": r["step"], "seconds": r["seconds"], "graph": run_["graph"], "arch": run_["arch"],
                "seed": run_["seed"], "setting": run_.get("setting"), "edge_topk": r["edge_topk"],
                "geometric_level": r["geometric_level"]} for run_ in runs for r in run_["curve"]]
    metrics = {"margin_sign_fractions": res["margin_sign_fractions"],
               "runs": {f"{r.get('setting') or r['graph'] + '/' + r['arch']}/seed{r['seed']}":
                        {k: v for k, v in r.items() if k != "curve"} for r in runs}}
    return C.write_results(out, SCRIPT, claim, cfg, device, time.time() - start, metrics, history, verdict,
                           checks=checks, precision=C.run_precision(device, "fp32"))


if __name__ == "__main__":
    run(C.cli(Config, __doc__.split("\n")[0], QUICK, validate, small=SMALL))
