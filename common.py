"""Shared machinery for the geometric-memory reproduction kit.

Everything that two or more claim scripts use lives here as flat functions and small modules:
graphs, tokens and on-device datasets, models (GPT, Mamba, Node2Vec), the training loop,
evaluation, geometry metrics, plotting and the run helpers (CLI, seeding, results.json).
What *defines* a claim (its graph size, schedule, metric threshold, figures) stays in its script.

Glossary of symbols (the paper's notation where it has one)
    G(d, l)   path-star graph: a root with d disjoint arms; l counts nodes *including* the root,
              so an arm has l-1 nodes and the graph d*(l-1)+1 nodes.
    T(d,k,l)  tree-star: root with d children, every non-leaf below them has k children,
              root-to-leaf paths of l nodes.
    d         root degree (number of arms); chance for the first path token is 1/d.
    l         path length in nodes, root included (l-1 hops).
    N         number of graph nodes; node tokens are 0..N-1, special tokens follow.
    V         vocabulary size = N + len(SPECIALS).
    k         number of [PAUSE] tokens after the leaf in a path prompt (or children per node, T).
    m, D      model width (embedding dimension); H heads; L layers.
    a1        first hop: the root's child on the queried arm (the "hardest token").
    E         token-embedding matrix (N x m rows for nodes); W the middle matrix of a 1-layer model.
    A, Deg    adjacency and degree matrices; L_rw = I - Deg^-1 A (random-walk Laplacian).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import matplotlib

matplotlib.use("Agg")  # headless: figures are always written to files
import matplotlib.pyplot as plt  # noqa: E402


# ======================================================================================
# Graphs
# ======================================================================================
@dataclass
class Graph:
    """A graph with its root-to-leaf paths and a train/test split of those paths.

    edges are undirected, stored once in their "forward" orientation (away from the root for
    stars and trees; i -> i+1 on the cycle; row-major right/down on the grid)."""

    name: str
    num_nodes: int
    edges: np.ndarray  # (E, 2) int64
    root: int | None = None
    paths: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))  # (P, l)
    train_paths: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    test_paths: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))

    @property
    def leaves(self) -> np.ndarray:
        return self.paths[:, -1]

    def adjacency(self, self_edges: bool = False) -> np.ndarray:
        """Symmetric 0/1 adjacency (N x N), float64; self-loops on the diagonal if asked."""
        A = np.zeros((self.num_nodes, self.num_nodes))
        A[self.edges[:, 0], self.edges[:, 1]] = 1.0
        A[self.edges[:, 1], self.edges[:, 0]] = 1.0
        if self_edges:
            A[np.arange(self.num_nodes), np.arange(self.num_nodes)] = 1.0
        return A

    def degrees(self) -> np.ndarray:
        return self.adjacency().sum(1).astype(np.int64)


def split_paths(paths: np.ndarray, train_ratio: float, seed: int, groups: np.ndarray | None = None):
    """Seeded split of paths into (train, test). With `groups` (one label per path, e.g. the
    first hop), whole groups go to one side, so test paths share no group with train paths."""
    rng = np.random.default_rng(seed)
    if groups is None:
        order = rng.permutation(len(paths))
        n_train = int(len(paths) * train_ratio)
        return paths[np.sort(order[:n_train])], paths[np.sort(order[n_train:])]
    labels = np.unique(groups)
    labels = labels[rng.permutation(len(labels))]
    train_labels = labels[: int(len(labels) * train_ratio)]
    is_train = np.isin(groups, train_labels)
    return paths[is_train], paths[~is_train]


def _star_like(name: str, d: int, k: int, l: int, seed: int, train_ratio: float, split_by_first_hop: bool) -> Graph:
    """Root with d children; below them every non-leaf node has k children; paths of l nodes.
    k = 1 gives the path-star G(d, l). Node labels are a seeded random permutation of 0..N-1."""
    per_arm = sum(k**i for i in range(l - 1))  # nodes below the root in one arm
    n = 1 + d * per_arm
    rng = np.random.default_rng(seed)
    label = rng.permutation(n)  # position in generation order -> node label
    next_id = iter(range(1, n))
    paths, edges = [], []
    for _ in range(d):
        frontier = [[0, next(next_id)]]  # partial paths in generation order
        edges.append((0, frontier[0][1]))
        for _ in range(l - 2):
            grown = []
            for p in frontier:
                for _ in range(k):
                    child = next(next_id)
                    edges.append((p[-1], child))
                    grown.append(p + [child])
            frontier = grown
        paths.extend(frontier)
    paths = label[np.array(paths, dtype=np.int64)]
    edges = label[np.array(edges, dtype=np.int64)]
    groups = paths[:, 1] if split_by_first_hop else None
    train, test = split_paths(paths, train_ratio, seed + 1, groups)
    return Graph(name, n, edges, int(label[0]), paths, train, test)


def path_star(d: int, l: int, seed: int = 0, train_ratio: float = 0.75) -> Graph:
    """Path-star G(d, l): d(l-1)+1 nodes, d(l-1) edges, d root-to-leaf paths of l nodes."""
    return _star_like(f"path_star_d{d}_l{l}", d, 1, l, seed, train_ratio, False)


def tree_star(d: int, k: int, l: int, seed: int = 0, train_ratio: float = 0.75, split: str = "leaf") -> Graph:
    """Tree-star T(d, k, l). split="leaf" holds out random leaves (a test path may share its
    prefix with a training path); split="first-token" holds out whole first-hop subtrees."""
    return _star_like(f"tree_star_d{d}_k{k}_l{l}", d, k, l, seed, train_ratio, split == "first-token")


def _walk_paths(edges: np.ndarray, n: int, l: int, seed: int) -> np.ndarray:
    """One non-backtracking random walk of l nodes from every node (tiny graphs' path set)."""
    nbrs = [[] for _ in range(n)]
    for u, v in edges:
        nbrs[u].append(int(v))
        nbrs[v].append(int(u))
    rng = np.random.default_rng(seed)
    paths = []
    for start in range(n):
        p = [start]
        while len(p) < l:
            options = [v for v in nbrs[p[-1]] if len(p) < 2 or v != p[-2]] or nbrs[p[-1]]
            p.append(int(options[rng.integers(len(options))]))
        paths.append(p)
    return np.array(paths, dtype=np.int64)


def grid_graph(rows: int, cols: int, l: int = 5, seed: int = 0, train_ratio: float = 0.75) -> Graph:
    """rows x cols grid, node id = row*cols + col (not permuted, as in the release)."""
    edges = [(r * cols + c, r * cols + c + 1) for r in range(rows) for c in range(cols - 1)]
    edges += [(r * cols + c, (r + 1) * cols + c) for r in range(rows - 1) for c in range(cols)]
    edges = np.array(sorted(edges), dtype=np.int64)
    paths = _walk_paths(edges, rows * cols, l, seed)
    return Graph(f"grid_{rows}x{cols}", rows * cols, edges, None, paths, *split_paths(paths, train_ratio, seed + 1))


def cycle_graph(n: int, l: int = 5, seed: int = 0, train_ratio: float = 0.75) -> Graph:
    """n-cycle; paths are the n clockwise runs of l nodes."""
    edges = np.array([(i, (i + 1) % n) for i in range(n)], dtype=np.int64)
    paths = (np.arange(n)[:, None] + np.arange(l)[None, :]) % n
    return Graph(f"cycle_{n}", n, edges, None, paths, *split_paths(paths, train_ratio, seed + 1))


# The fixed 16-node, 20-edge irregular graph of the release (nodes 12-15 form a separate K4).
IRREGULAR_EDGES = [(0, 1), (0, 11), (1, 2), (1, 3), (2, 3), (3, 4), (4, 5), (5, 6), (5, 8), (6, 7),
                   (7, 8), (8, 9), (9, 10), (10, 11), (12, 13), (12, 14), (12, 15), (13, 14), (13, 15), (14, 15)]


def irregular_graph(l: int = 5, seed: int = 0, train_ratio: float = 0.75) -> Graph:
    edges = np.array(IRREGULAR_EDGES, dtype=np.int64)
    paths = _walk_paths(edges, 16, l, seed)
    return Graph("irregular_16", 16, edges, None, paths, *split_paths(paths, train_ratio, seed + 1))


def directed_edges(g: Graph, direction: str = "both", self_edges: bool = False) -> np.ndarray:
    """Directed (u, v) training pairs: 'forward', 'backward' or 'both' orientations, plus
    (u, u) for every node when self_edges."""
    parts = []
    if direction in ("forward", "both"):
        parts.append(g.edges)
    if direction in ("backward", "both"):
        parts.append(g.edges[:, ::-1])
    if self_edges:
        parts.append(np.repeat(np.arange(g.num_nodes)[:, None], 2, 1))
    return np.ascontiguousarray(np.concatenate(parts)).astype(np.int64)


# ======================================================================================
# Tokens and on-device datasets
# ======================================================================================
# Node ids come first (0..N-1); these follow in this order. "|", "/", "=", "$" are the
# separators and the teacherless dummy of the in-context task (Bachmann & Nagarajan 2024).
SPECIALS = ["[EDGE]", "[PATH]", "[PAUSE]", "[PAD]", "|", "/", "=", "$"]


def special(name: str, num_nodes: int) -> int:
    return num_nodes + SPECIALS.index(name)


def vocab_size(num_nodes: int) -> int:
    return num_nodes + len(SPECIALS)


@dataclass
class TokenSet:
    """Fixed-length examples that live on one device. Every example in a set has the same
    layout, so the loss positions are shared: targets[:, loss_pos] are the labels (never -1)."""

    name: str
    inputs: torch.Tensor  # (n, T) int64 token ids
    targets: torch.Tensor  # (n, T) int64, -1 where there is no loss
    loss_pos: torch.Tensor  # (n_loss,) positions whose next token is predicted

    def __len__(self):
        return self.inputs.shape[0]

    @property
    def labels(self) -> torch.Tensor:  # (n, n_loss)
        return self.targets[:, self.loss_pos]

    def to(self, device) -> "TokenSet":
        return TokenSet(self.name, self.inputs.to(device), self.targets.to(device), self.loss_pos.to(device))


def make_token_set(name: str, prefixes: np.ndarray, answers: np.ndarray, device="cpu",
                   hide_answers_with: int | None = None) -> TokenSet:
    """Build next-token examples: sequence = prefix ++ answer, inputs = sequence[:-1], loss on the
    positions that predict the answer tokens. `hide_answers_with` replaces the answer tokens in
    the *input* by a dummy id (teacherless training): the targets are unchanged."""
    prefixes = np.asarray(prefixes, dtype=np.int64)
    answers = np.asarray(answers, dtype=np.int64)
    if answers.ndim == 1:
        answers = answers[:, None]
    seq = np.concatenate([prefixes, answers], 1)  # (n, P + A)
    P, A = prefixes.shape[1], answers.shape[1]
    inputs = seq[:, :-1].copy()
    if hide_answers_with is not None:
        inputs[:, P:] = hide_answers_with
    targets = np.full_like(inputs, -1)
    targets[:, P - 1:] = answers  # position P-1+i predicts answer token i
    loss_pos = np.arange(P - 1, P - 1 + A)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return TokenSet(name, as_t(inputs), as_t(targets), as_t(loss_pos))


def edge_examples(g: Graph, direction="both", self_edges=False, device="cpu") -> TokenSet:
    """`[EDGE] u -> v`: one example per directed edge, loss only on v."""
    pairs = directed_edges(g, direction, self_edges)
    prefix = np.stack([np.full(len(pairs), special("[EDGE]", g.num_nodes)), pairs[:, 0]], 1)
    return make_token_set(f"edges_{direction}", prefix, pairs[:, 1], device)


def path_prefixes(paths: np.ndarray, num_nodes: int, pauses: int, query: str = "leaf") -> np.ndarray:
    """`[PATH] leaf [PAUSE]*k` (query="leaf") or `[PATH] root leaf [PAUSE]*k` (query="root,leaf")."""
    cols = [np.full(len(paths), special("[PATH]", num_nodes))]
    if query == "root,leaf":
        cols.append(paths[:, 0])
    cols.append(paths[:, -1])
    cols += [np.full(len(paths), special("[PAUSE]", num_nodes))] * pauses
    return np.stack(cols, 1)


def path_examples(paths: np.ndarray, num_nodes: int, pauses: int, target: str = "full", device="cpu",
                  name: str = "paths") -> TokenSet:
    """Path prompts with three targets: 'full' = root a1 ... leaf (loss on every token),
    'first' = a1 only (the hardest token: one loss position, the root never in the input),
    'reverse' = leaf ... root."""
    prefix = path_prefixes(paths, num_nodes, pauses)
    answer = {"full": paths, "first": paths[:, 1:2], "reverse": paths[:, ::-1]}[target]
    return make_token_set(f"{name}_{target}", prefix, answer, device)


# ======================================================================================
# Models
# ======================================================================================
@dataclass
class GPTConfig:
    """Decoder-only Transformer (nanoGPT-style). Every ablation switch of the paper is a field."""

    vocab_size: int
    block_size: int = 64
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 384
    mlp: str = "gelu"  # "gelu": Linear(m,4m)-GELU-Linear(4m,m); "linear": one m x m matrix (TinyNN/associative)
    attention: bool = True
    residual: bool = True
    layernorm: bool = True
    positions: str = "sinusoidal"  # "sinusoidal" (paper) | "learned" (release; N(0,0.02) here) | "none"
    tied: bool = True  # lm_head shares the token-embedding matrix
    freeze_embeddings: bool = False  # token embedding (and the tied head) get no gradient
    init: str = "gpt"  # "gpt": every weight N(0, 0.02); "unit": token embedding / head N(0, 1)
    bias: bool = True
    dropout: float = 0.0


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, shapes=None):
        """x: (B, T, m); or, with `shapes` = [(B_i, T_i), ...], (N, m): the tokens of several token sets one after
        another (N = sum B_i T_i), whose projections run once over all of them and attention within each set."""
        if shapes is None:
            return self.proj(self.attend(self.qkv(x)))
        parts = self.qkv(x).split([b * t for b, t in shapes])  # per set: (B_i T_i, 3m)
        y = torch.cat([self.attend(p.view(b, t, -1)).flatten(0, 1) for p, (b, t) in zip(parts, shapes)])  # (N, m)
        return self.proj(y)

    def attend(self, qkv):  # (B, T, 3m) -> (B, T, m), causal
        B, T, m = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = (t.view(B, T, self.n_head, m // self.n_head).transpose(1, 2)
                   for t in qkv.split(m, dim=2))  # 3 x (B, H, T, m/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, m/H)
        return y.transpose(1, 2).reshape(B, T, m)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.n_embd, bias=cfg.bias)) if cfg.layernorm else nn.Identity
        self.residual = cfg.residual
        self.ln_1, self.attn = (norm(), SelfAttention(cfg)) if cfg.attention else (None, None)
        self.ln_2 = norm()
        if cfg.mlp == "linear":  # the single trainable matrix of the paper's TinyNN / associative model
            self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))
        else:
            self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(approximate="tanh"),
                                     nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))

    def forward(self, x, shapes=None):  # (B, T, m) -> (B, T, m); or (N, m) -> (N, m), see SelfAttention
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x), shapes) if self.residual else self.attn(self.ln_1(x), shapes)
        return x + self.mlp(self.ln_2(x)) if self.residual else self.mlp(self.ln_2(x))


def sinusoidal_table(T: int, m: int) -> torch.Tensor:
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, m, 2, dtype=torch.float32) * (-math.log(10000.0) / m))
    table = torch.zeros(T, m)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : m // 2]
    return table  # (T, m)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.positions == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.layernorm else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        init_weights(self)
        if cfg.init == "unit":  # the release's "non_geometric" init: embedding / head ~ N(0, 1)
            nn.init.normal_(self.lm_head.weight, std=1.0)
            if not cfg.tied:
                nn.init.normal_(self.wte.weight, std=1.0)
        if cfg.tied:
            self.wte.weight = self.lm_head.weight
        if cfg.freeze_embeddings:
            self.wte.weight.requires_grad_(False)
            self.lm_head.weight.requires_grad_(False)

    def embed(self, idx):  # idx: (B, T) -> (B, T, m): tokens plus positions
        x = self.wte(idx)
        if self.cfg.positions == "learned":
            x = x + self.wpe.weight[: idx.shape[1]]
        elif self.cfg.positions == "sinusoidal":
            x = x + self.pos_table[: idx.shape[1]]
        return x

    def hidden(self, idx):  # idx: (B, T) -> (B, T, m)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx, loss_pos=None):
        """Logits (B, n_loss, V) at the positions `loss_pos` only (all positions if None):
        the vocabulary is large, so the head is applied after gathering. Given a list of token sets
        [(idx, loss_pos), ...] instead: merged_sets_logits."""
        if isinstance(idx, (list, tuple)):
            return self.merged_sets_logits(idx)
        h = self.hidden(idx)
        if loss_pos is not None:
            h = h[:, loss_pos]  # (B, n_loss, m)
        return self.lm_head(h)

    def merged_sets_logits(self, sets):
        """Logits of several token sets of different lengths (a training step's edges and paths) in one pass,
        flat: (sum_i B_i n_loss_i, V), set after set. Every example sees what forward() shows it (attention
        stays within each set, positions start at 0 in each), but every per-token layer and the head run
        once over all the tokens: fewer kernels than one forward per set, each larger (inductor on the CPU,
        12 layers, G(5000,5): 944 -> 586 generated kernels for the step; README "Speed")."""
        shapes = [tuple(idx.shape) for idx, _ in sets]
        x = torch.cat([self.embed(idx).flatten(0, 1) for idx, _ in sets])  # (N, m), N = sum B_i T_i
        for block in self.blocks:
            x = block(x, shapes)
        x = self.ln_f(x)
        rows = [part.view(b, t, -1)[:, pos].flatten(0, 1)  # (B_i n_loss_i, m)
                for part, (_, pos), (b, t) in zip(x.split([b * t for b, t in shapes]), sets, shapes)]
        return self.lm_head(torch.cat(rows))  # (sum B_i n_loss_i, V)


def init_weights(model: nn.Module, std: float = 0.02) -> int:
    """N(0, std) for every Linear/Embedding weight, zero biases, LayerNorm (1, 0). Parameters marked
    `_no_reinit` (Mamba's dt bias) keep their special init. Returns how many tensors were set."""
    count = 0
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding, nn.Conv1d)) and not getattr(mod.weight, "_no_reinit", False):
            if isinstance(mod, nn.Conv1d):
                continue  # the conv keeps PyTorch's default init (as mamba_ssm does)
            nn.init.normal_(mod.weight, std=std)
            count += 1
            if getattr(mod, "bias", None) is not None and not getattr(mod.bias, "_no_reinit", False):
                nn.init.zeros_(mod.bias)
    assert count > 0, "init_weights matched no parameter"
    return count


def count_params(model: nn.Module) -> dict:
    seen, total, emb = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if name.startswith(("wte", "lm_head", "wpe")):
            emb += p.numel()
    return {"total": total, "non_embedding": total - emb}


# --- Mamba: pure-PyTorch selective scan (a loop over time with a hand-written backward) ---
class _SelectiveScan(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t (h_{-1} = 0), time-major:
    u, delta: (L, B, ED); A: (ED, N); B, C: (L, B, N) -> y: (L, B, ED).

    One function for the whole scan: only the states h (L, B, ED, N) are kept for the backward, and
    only the two recurrences loop over time (one fused multiply-add a step); every other product is
    one batched operation over all L. On a CPU ~2.5x faster than composing the scan from autograd ops,
    with half the memory (README, "Speed")."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        decay = torch.exp(delta[1:].unsqueeze(-1) * A)  # steps 1..L-1 (step 0 decays h_{-1} = 0): (L-1, B, ED, N)
        h = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # the input terms, overwritten by the states: (L, B, ED, N)
        for t in range(1, len(u)):
            h[t].addcmul_(decay[t - 1], h[t - 1])
        ctx.save_for_backward(u, delta, A, B, C, h)
        return (h @ C.unsqueeze(-1)).squeeze(-1)  # (L, B, ED)

    @staticmethod
    def backward(ctx, grad_y):
        u, delta, A, B, C, h = ctx.saved_tensors
        decay = torch.exp(delta[1:].unsqueeze(-1) * A)  # rebuilt, not kept: (L-1, B, ED, N)
        dh = grad_y.unsqueeze(-1) * C.unsqueeze(2)  # dLoss/dh_t through y_t: (L, B, ED, N) ...
        for t in range(len(u) - 2, -1, -1):
            dh[t].addcmul_(decay[t], dh[t + 1])  # ... and through h_{t+1} (decay[t] is step t+1's)
        grad_C = (grad_y.unsqueeze(2) @ h).squeeze(2)  # (L, B, N)
        grad_in = (dh @ B.unsqueeze(-1)).squeeze(-1)  # dLoss/d(delta_t u_t): (L, B, ED)
        grad_B = ((delta * u).unsqueeze(2) @ dh).squeeze(2)  # (L, B, N)
        grad_u, grad_delta = grad_in * delta, grad_in * u
        dz = dh[1:] * h[:-1] * decay  # dLoss/d(delta_t A), t >= 1 (h_{-1} = 0): (L-1, B, ED, N)
        grad_delta[1:] += torch.einsum("lbdn,dn->lbd", dz, A)
        grad_A = torch.einsum("lbdn,lbd->dn", dz, delta[1:])
        return grad_u, grad_delta, grad_A, grad_B, grad_C


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Semantics of mamba_ssm's selective_scan_ref (real A, input-dependent B/C).

    u, delta, z: (B, ED, L); A: (ED, N); B, C: (B, N, L); D, delta_bias: (ED,)."""
    out_dtype = u.dtype
    ct = torch.promote_types(u.dtype, torch.float32)  # fp32 at least; keeps fp64 for tests
    # Autocast would push the products back to bf16; the recurrence needs fp32.
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(ct)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        u_t, delta_t, B_t, C_t = (t.permute(2, 0, 1).contiguous() for t in (u, delta, B, C))  # (L, B, ED) / (L, B, N)
        y = _SelectiveScan.apply(u_t, delta_t, A, B_t, C_t).permute(1, 2, 0)  # (B, ED, L)
        if D is not None:
            y = y + u * D.to(ct)[:, None]
        if z is not None:
            y = y * F.silu(z.to(ct))
    return y.to(out_dtype)


def causal_depthwise_conv(x, weight, bias=None):
    """= nn.Conv1d(groups=channels, padding=K-1)(x)[..., :L], as K shifted products: on a CPU the
    library's depthwise backward was ~15% of a Mamba step. x: (B, ED, L); weight: (ED, 1, K)."""
    K, L = weight.shape[-1], x.shape[-1]
    padded = F.pad(x, (K - 1, 0))  # (B, ED, L + K - 1)
    out = sum(weight[:, 0, k, None] * padded[..., k:k + L] for k in range(K))  # (B, ED, L)
    return out if bias is None else out + bias[:, None]


class MambaBlock(nn.Module):
    """Mamba-1 mixer with mamba_ssm.Mamba's parameter names, so state dicts match."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, conv_bias=True, bias=False, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        # holds the conv's weights (mamba_ssm's names and init); applied by causal_depthwise_conv
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

        # dt_proj init keeps softplus(bias) = dt in [dt_min, dt_max] (log-uniform) at start.
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner, device=device)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_proj.bias._no_reinit = True  # model-level init must not overwrite this

        # S4D-real init: A = -(1..N) per channel; stored as log to keep A negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # (d_inner, d_state), kept fp32 as in mamba_ssm
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

    def forward(self, hidden):
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2*ED, L)
        x, z = xz.chunk(2, dim=1)  # (B, ED, L) each
        x = F.silu(causal_depthwise_conv(x, self.conv1d.weight, self.conv1d.bias))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, Bm, Cm = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # (B, ED, L); the bias goes in the scan. Contiguous, so that its gradient's layout does not depend on
        # how the scan's backward was computed (AOTAutograd traced one layout and met another: test_gpu_path_on_cpu).
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2).contiguous()
        A = -torch.exp(self.A_log.float())  # (ED, N)
        y = selective_scan(x, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D.float(),
                           z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d_model)


def mamba_ssm_available(device):
    """True if the fused CUDA mamba_ssm kernels can run on `device`."""
    if torch.device(device).type != "cuda":
        return False
    try:  # broken builds raise OSError/undefined-symbol errors, not only ImportError
        from mamba_ssm import Mamba  # noqa: F401
        import mamba_ssm.ops.selective_scan_interface as ssi
    except Exception:
        return False
    return getattr(ssi, "selective_scan_cuda", None) is not None


def make_mamba_mixer(d_model, d_state, d_conv, expand, device, impl="auto"):
    """Return (module, backend) with backend in {"mamba_ssm", "torch"}."""
    if impl not in ("auto", "cuda", "torch"):
        raise ValueError(f"impl must be 'auto', 'cuda' or 'torch', got {impl!r}")
    if impl != "torch" and mamba_ssm_available(device):
        from mamba_ssm import Mamba
        return Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand).to(device), "mamba_ssm"
    if impl == "cuda":
        raise RuntimeError(f"impl='cuda' requested but mamba_ssm CUDA kernels are unavailable on "
                           f"device {device!r} (need an importable mamba_ssm with selective_scan_cuda "
                           f"and a cuda device); use impl='auto' or 'torch'")
    return MambaBlock(d_model, d_state=d_state, d_conv=d_conv, expand=expand).to(device), "torch"


@dataclass
class MambaConfig:
    """Mamba language model of the same depth and width as the GPT (paper App. C.1)."""

    vocab_size: int
    n_layer: int = 12
    n_embd: int = 384
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    residual: bool = True  # x + Mamba(LN(x)); the release chained blocks without a residual
    final_norm: bool = True  # a LayerNorm before the head; the release had none
    tied: bool = True
    freeze_embeddings: bool = False
    impl: str = "auto"  # "auto": mamba_ssm's CUDA kernel when available, else pure PyTorch; "torch"; "cuda"
    # "mamba_ssm": the library's init (dt bias = inverse softplus of dt in [1e-3, 0.1], out_proj / sqrt(L));
    # "release": the authors' release, which re-drew every mixer Linear N(0, 0.02) with zero biases, so
    # dt = softplus(0) = 0.69 at start. The release's whole block is init="release", residual=False,
    # final_norm=False: at CPU scale only that combination generalized at all (README row 4).
    init: str = "mamba_ssm"


class MambaLM(nn.Module):
    def __init__(self, cfg: MambaConfig, device="cpu"):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.norms = nn.ModuleList([nn.LayerNorm(cfg.n_embd) for _ in range(cfg.n_layer)])
        mixers = [make_mamba_mixer(cfg.n_embd, cfg.d_state, cfg.d_conv, cfg.expand, device, cfg.impl)
                  for _ in range(cfg.n_layer)]
        self.backend = mixers[0][1] if mixers else "none"
        self.mixers = nn.ModuleList([m for m, _ in mixers])
        self.ln_f = nn.LayerNorm(cfg.n_embd) if cfg.final_norm else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # mamba_ssm's LM init: embeddings N(0, 0.02), every bias zero except the marked dt bias;
        # the mixer weights keep the init their constructor gave them (the release overwrote them).
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        for mod in self.mixers.modules():
            if isinstance(mod, nn.Linear) and mod.bias is not None and not getattr(mod.bias, "_no_reinit", False):
                nn.init.zeros_(mod.bias)
        # mamba_ssm's rescale_prenorm_residual: each block's out_proj (the residual branch's last
        # matrix, default kaiming-uniform init) is scaled by 1/sqrt(n_layer), so that the residual
        # stream's variance does not grow with depth.
        if cfg.init not in ("mamba_ssm", "release"):
            raise ValueError(f"MambaConfig.init must be 'mamba_ssm' or 'release', got {cfg.init!r}")
        with torch.no_grad():
            for mixer in self.mixers:
                if cfg.init == "mamba_ssm":
                    mixer.out_proj.weight /= math.sqrt(cfg.n_layer)
                    continue
                for lin in (m for m in mixer.modules() if isinstance(m, nn.Linear)):  # the release: every Linear
                    nn.init.normal_(lin.weight, std=0.02)  # N(0, 0.02), every bias (the dt bias too) zero
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
        if cfg.tied:
            self.wte.weight = self.lm_head.weight
        if cfg.freeze_embeddings:
            self.wte.weight.requires_grad_(False)
            self.lm_head.weight.requires_grad_(False)

    def hidden(self, idx):  # (B, T) -> (B, T, m)
        x = self.wte(idx)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x)) if self.cfg.residual else mixer(norm(x))
        return self.ln_f(x)

    def forward(self, idx, loss_pos=None):
        h = self.hidden(idx)
        if loss_pos is not None:
            h = h[:, loss_pos]  # (B, n_loss, m)
        return self.lm_head(h)


def build_model(kind: str, vocab: int, n_layer: int, n_embd: int, n_head: int, device, **overrides) -> nn.Module:
    """One entry point for the sequence models the claim scripts train ('gpt' or 'mamba');
    `overrides` sets any other field of GPTConfig / MambaConfig."""
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides))
    elif kind == "mamba":
        model = MambaLM(MambaConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, **overrides), device)
    else:
        raise ValueError(f"unknown model {kind!r}")
    return model.to(device)


def redraw_frozen_embeddings(model: nn.Module, std: float, seed: int) -> None:
    """Redraw the (tied) token embedding N(0, std) from a host generator (same values on any device).
    Used for frozen-embedding runs: frozen at the GPT init N(0, 0.02) the tied logits are too flat to
    store even the edges (measured: G(100,5), 2x64, edge top-1 0.25 after 8,000 steps), which would
    make a failure claim trivial; at 0.2 the frozen model memorizes every edge and training path."""
    with torch.no_grad():
        draw = torch.randn(model.wte.weight.shape, generator=torch.Generator().manual_seed(seed))
        model.wte.weight.copy_(draw * std)


def model_backend(model: nn.Module) -> str:
    return getattr(model, "backend", "sdpa" if isinstance(model, GPT) else type(model).__name__)


# ======================================================================================
# Training
# ======================================================================================
@dataclass
class TrainConfig:
    steps: int
    batch_size: int  # examples per step over all sets; <= 0 means full batch (every example, every step)
    lr: float
    warmup: int = 0  # linear warmup from LR 0 at step 0 (an untrained model hit once at full LR collapses)
    schedule: str = "cosine"  # "cosine": to min_lr_ratio * lr at the last step; "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    decay_embeddings: bool = True  # apply weight decay to the token embedding (paper/release: yes)
    embed_lr_mult: float = 1.0  # the token embedding's (and tied head's) LR = this x the body LR (paper: 1)
    betas: tuple = (0.9, 0.999)
    grad_clip: float = 0.0  # 0 = off (the release does not clip)
    eval_every: int = 500
    compile: bool = False  # torch.compile the model (CUDA only; falls back to eager on failure)
    compile_mode: str = "default"  # torch.compile's mode; "reduce-overhead" adds CUDA graphs (fewer launches)
    precision: str = "bf16"  # "bf16": autocast on CUDA (fp32 on CPU); "fp32": fp32 everywhere
    merge_sets: bool = False  # GPT: one forward over all of a step's token sets (GPT.merged_sets_logits), fewer kernels
    regional_compile: bool = False  # compile each layer, not the whole model (try_compile): ~1/l of the compile time
    stop_when: Callable[[dict], bool] | None = None  # end the run at the first evaluation record it accepts


def lr_at(step: int, tc: TrainConfig) -> float:
    if tc.warmup > 0 and step < tc.warmup:
        return tc.lr * step / tc.warmup
    if tc.schedule == "constant":
        return tc.lr
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    floor = tc.lr * tc.min_lr_ratio
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * progress))


def gpu_path(device) -> bool:
    """Whether training on `device` takes the GPU path: bf16 autocast (where the run asks for bf16),
    fused AdamW and torch.compile (where the run asks for it). True on CUDA only; the tests set it
    True on the CPU (`test_gpu_path_on_cpu`) so that the GPU path's code runs in CI, which has no GPU."""
    return torch.device(device).type == "cuda"


def make_optimizer(model: nn.Module, tc: TrainConfig, device) -> torch.optim.AdamW:
    """AdamW with three named groups: "body_decay" (matrices), "body_no_decay" (biases, norms and
    `_no_weight_decay` parameters) and "embedding" (the token embedding and the output head, one tensor
    when tied; an untied head stays in this group so that untying changes only the tying): its LR is
    tc.embed_lr_mult x the schedule, its decay tc.weight_decay iff tc.decay_embeddings. AdamW's decay is
    decoupled and scaled by the group's LR (p <- p (1 - lr wd)), so the embedding also decays
    embed_lr_mult times faster per step than the body at the same weight_decay. Every group carries its
    "lr_mult"; frozen parameters are left out; every trainable parameter lands in exactly one group (asserted)."""
    emb = {id(getattr(model, name).weight) for name in ("wte", "lm_head") if hasattr(model, name)}  # positions: body
    groups = {"body_decay": [], "body_no_decay": [], "embedding": []}
    seen = set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in emb:
            groups["embedding"].append(p)
        elif p.dim() >= 2 and not getattr(p, "_no_weight_decay", False):
            groups["body_decay"].append(p)
        else:
            groups["body_no_decay"].append(p)
    assert sum(map(len, groups.values())) == len({id(p) for p in trainable})
    settings = {"body_decay": (tc.weight_decay, 1.0), "body_no_decay": (0.0, 1.0),
                "embedding": (tc.weight_decay if tc.decay_embeddings else 0.0, tc.embed_lr_mult)}
    param_groups = [{"params": ps, "name": name, "weight_decay": settings[name][0], "lr_mult": settings[name][1],
                     "lr": lr_at(0, tc) * settings[name][1]} for name, ps in groups.items() if ps]
    return torch.optim.AdamW(param_groups, lr=lr_at(0, tc), betas=tc.betas, fused=gpu_path(device))


def set_lr(opt: torch.optim.Optimizer, step: int, tc: TrainConfig) -> None:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, tc) * group.get("lr_mult", 1.0)


def autocast(device, precision: str = "bf16"):
    """bf16 autocast on the GPU path when precision == "bf16"; a no-op otherwise (CPU runs, and any
    run that asks for "fp32", stay in fp32). Scripts whose metrics are sign-sensitive (tiny-graph
    margins) ask for fp32: bf16 rounding flips small margins."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    if gpu_path(device) and precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return torch.autocast(torch.device(device).type, enabled=False)


def run_precision(device, precision: str = "bf16") -> str:
    """The precision a run actually computes in (recorded in results.json): bf16 only on the GPU path."""
    return "bf16-autocast" if gpu_path(device) and precision == "bf16" else "fp32"


def batch_shares(sets: list[TokenSet], batch_size: int) -> list[int]:
    """Examples per step from each set, in proportion to the set sizes (at least one each);
    batch_size <= 0 (or larger than everything) means full batch."""
    sizes = [len(s) for s in sets]
    if batch_size <= 0 or batch_size >= sum(sizes):
        return sizes
    shares = [max(1, round(batch_size * n / sum(sizes))) for n in sizes]
    shares[int(np.argmax(sizes))] += batch_size - sum(shares)
    return shares


class Sampler:
    """Epoch-wise shuffling of each set: every example is seen once per epoch of its own set, no
    DataLoader. Permutations are drawn on the sets' device from a seeded generator of that device,
    so the host never waits for the GPU at an epoch boundary (on the CPU: the same draws as a host
    generator)."""

    def __init__(self, sets: list[TokenSet], shares: list[int], seed: int):
        self.sets, self.shares = sets, shares
        device = sets[0].inputs.device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.perm = [None] * len(sets)
        self.cursor = [0] * len(sets)

    def next(self):
        batch = []
        for i, (s, b) in enumerate(zip(self.sets, self.shares)):
            if b >= len(s):
                batch.append((s.inputs, s.labels, s.loss_pos))
                continue
            if self.perm[i] is None or self.cursor[i] + b > len(s):
                self.perm[i] = torch.randperm(len(s), generator=self.gen, device=s.inputs.device)
                self.cursor[i] = 0
            idx = self.perm[i][self.cursor[i]: self.cursor[i] + b]
            self.cursor[i] += b
            batch.append((s.inputs[idx], s.labels[idx], s.loss_pos))
        return batch


def batch_loss(model, batch, merged: bool = False) -> torch.Tensor:
    """Mean cross-entropy over every loss token of the batch (a full-path example counts l times).
    merged: one forward over all the batch's token sets (GPT.merged_sets_logits), the same loss."""
    if merged:
        logits = model([(x, pos) for x, _, pos in batch])  # (sum B_i n_loss_i, V)
        labels = torch.cat([y.flatten() for _, y, _ in batch])
        return F.cross_entropy(logits.float(), labels)
    total, count = 0.0, 0
    for x, y, pos in batch:
        logits = model(x, pos)  # (b, n_loss, V)
        total = total + F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        count += y.numel()
    return total / count


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


REPEATED_LAYERS = ("blocks", "mixers")  # GPT's and MambaLM's stacks of identical layers
COMPILE_FELL_BACK = "torch.compile failed"  # opens the stderr line of a run that goes on eager (gpu_check reads it)


def try_compile(model: nn.Module, enabled: bool, device, mode: str = "default", regional: bool = False) -> nn.Module:
    """The module that training steps call: `model` compiled (on the GPU path), or `model` itself.
    regional: compile each of the l identical layers instead of the whole model. They share one
    compiled graph per input shape (parameters are graph inputs), so compilation costs about one
    layer, not l; the embedding, final norm, head and loss stay eager, and no fusion crosses a layer
    boundary. The returned view shares every parameter with `model`, which itself stays eager (for
    evaluation, whose shapes differ from training's and would each compile anew)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    if not enabled or not gpu_path(device):
        return model
    try:  # static shapes: each token set keeps one (batch, length) shape for the whole run
        if regional:
            view = copy.copy(model)  # shares parameters, buffers and submodules with `model` ...
            view._modules = dict(model._modules)  # ... but not the table of them: swapping layers leaves `model` eager
            for name in REPEATED_LAYERS:
                if name in view._modules:
                    setattr(view, name, nn.ModuleList(torch.compile(layer, dynamic=False, mode=mode)
                                                      for layer in getattr(model, name)))
            return view
        return torch.compile(model, dynamic=False, mode=mode)
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
        print(f"{COMPILE_FELL_BACK} ({type(exc).__name__}: {exc}); running eager", file=sys.stderr)
        return model


def optimizer_step(fwd: nn.Module, model: nn.Module, opt, batch, tc: TrainConfig, device) -> torch.Tensor:
    """One training step through `fwd` (the compiled or the eager model): loss, backward, clip, step."""
    with autocast(device, tc.precision):
        loss = batch_loss(fwd, batch, tc.merge_sets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    opt.step()
    return loss.detach()


def guarded_step(fwd: nn.Module, model: nn.Module, opt, batch, tc: TrainConfig, device):
    """optimizer_step, falling back to the eager model when the compiled one fails. Compilation is
    lazy for the forward *and* the backward graph, so a compiler failure shows up in either during
    the first step; nothing has been applied to the weights then (opt.step comes last), so the step
    is redone eagerly. Returns (loss, the module to use from now on)."""
    try:
        return optimizer_step(fwd, model, opt, batch, tc, device), fwd
    except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
        if fwd is model:
            raise
        print(f"{COMPILE_FELL_BACK} at the first step ({type(exc).__name__}: {str(exc)[:200]}); running eager",
              file=sys.stderr)
        return optimizer_step(model, model, opt, batch, tc, device), model


def time_steps(fwd: nn.Module, model: nn.Module, opt, sampler: Sampler, tc: TrainConfig, device,
               n: int) -> tuple[float, nn.Module]:
    """Wall seconds of n training steps (the GPU synchronised at both ends), and the module to go on
    with (guarded_step may have fallen back to eager)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.time()
    for _ in range(n):
        _, fwd = guarded_step(fwd, model, opt, sampler.next(), tc, device)
    sync()
    return time.time() - t0, fwd


LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")  # host-side launches


def profile_steps(fwd: nn.Module, model: nn.Module, opt, sampler: Sampler, tc: TrainConfig, device, n: int,
                  path: str) -> tuple[dict, nn.Module]:
    """torch.profiler over n training steps (run after a warm-up): writes the operator table (most
    self device time first on a GPU, self CPU time on a CPU) to `path` and returns per-step counts
    that say whether launches or arithmetic set the step's time, and the module to go on with."""
    cuda = torch.device(device).type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        seconds, fwd = time_steps(fwd, model, opt, sampler, tc, device, n)
    events = prof.key_averages()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"  # < 2.4
    with open(path, "w") as f:
        f.write(events.table(sort_by=busy if cuda else "self_cpu_time_total", row_limit=40))
    per_step = lambda x: round(x / n, 2)  # noqa: E731
    summary = {"profiled_steps": n, "ms_per_step": per_step(seconds * 1e3), "table": os.path.basename(path)}
    if cuda:  # busy << ms_per_step: the host's launches, not the GPU, set the step's time
        summary.update(device_kernels_per_step=per_step(sum(e.count for e in on_device)),
                       device_busy_ms_per_step=per_step(sum(getattr(e, busy) for e in on_device) / 1e3),
                       kernel_launch_calls_per_step=per_step(sum(e.count for e in events if e.key in LAUNCH_CALLS)),
                       graph_launches_per_step=per_step(sum(e.count for e in events if e.key == "cudaGraphLaunch")))
    return summary, fwd


def cpu_time_check(script: str, model: nn.Module, sets: list[TokenSet], tc: TrainConfig, device, cpu_command: str,
                   budget_s: float = 900.0, timed_steps: int = 2) -> float | None:
    """On a CPU, time a few training steps of a throwaway copy of the model (the run itself is not
    touched) and, when tc.steps of them would exceed budget_s, say so in one line, with a CPU-sized
    command of the same claim. The run goes on: a user may mean it. Returns the estimate."""
    if torch.device(device).type != "cpu":
        return None
    probe = copy.deepcopy(model)
    opt = make_optimizer(probe, tc, device)
    sampler = Sampler(sets, batch_shares(sets, tc.batch_size), 0)
    time_steps(probe, probe, opt, sampler, tc, device, 1)  # first step: allocator warm-up
    per_step = time_steps(probe, probe, opt, sampler, tc, device, timed_steps)[0] / timed_steps
    estimate = per_step * tc.steps
    del probe, opt
    if estimate > budget_s:
        print(f"[{script}] on this CPU the run would take ~{estimate / 3600:.1f} h of training ({per_step:.2f} s/step "
              f"x {tc.steps} steps, timed over {timed_steps}); it is sized for a GPU. A CPU-sized run of the same "
              f"claim: {cpu_command}", flush=True)
    return estimate


def train(model: nn.Module, sets: list[TokenSet], tc: TrainConfig, device, seed: int = 0,
          evaluate: Callable[[], dict] | None = None, log: Callable[[str], None] = print,
          optimizer=None, step_offset: int = 0, seconds_offset: float = 0.0) -> list[dict]:
    """Train on mixed batches of `sets` for tc.steps steps; call `evaluate()` every tc.eval_every
    steps and at the end. Returns the history: one dict per evaluation with the step, the epoch
    (passes over all of `sets`), the seconds since the start (+ seconds_offset, for staged runs),
    the mean training loss since the last evaluation and the metrics. The last entry also holds
    train_seconds and eval_seconds. Nothing syncs with the device between evaluations."""
    shares = batch_shares(sets, tc.batch_size)
    examples = sum(len(s) for s in sets)
    sampler = Sampler(sets, shares, seed)
    opt = optimizer or make_optimizer(model, tc, device)
    fwd = try_compile(model, tc.compile, device, tc.compile_mode, tc.regional_compile)
    history, start = [], time.time()
    running, n_running = torch.zeros((), device=device), 0
    eval_seconds = 0.0
    for step in range(tc.steps + 1):
        if step % tc.eval_every == 0 or step == tc.steps:
            train_loss = (running.item() / n_running) if n_running else None  # waits for the steps in flight
            t0 = time.time()  # so that their time is training's, not the evaluation's
            record = {"step": step + step_offset, "epoch": round(step * sum(shares) / examples, 3),
                      "seconds": round(t0 - start + seconds_offset, 2), "train_loss": train_loss}
            model.eval()
            with torch.no_grad(), autocast(device, tc.precision):
                record.update(evaluate() if evaluate else {})
            model.train()
            eval_seconds += time.time() - t0
            history.append(record)
            running.zero_()
            n_running = 0
            log(progress_line(record, tc.steps + step_offset))
            if tc.stop_when is not None and step < tc.steps and tc.stop_when(record):
                record["stopped_early"] = True  # the schedule still spans tc.steps: the curve so far is unchanged
                break
        if step == tc.steps:
            break
        set_lr(opt, step, tc)
        loss, fwd = guarded_step(fwd, model, opt, sampler.next(), tc, device)
        running += loss
        n_running += 1
    history[-1]["train_seconds"] = round(time.time() - start - eval_seconds, 2)
    history[-1]["eval_seconds"] = round(eval_seconds, 2)
    return history


def progress_line(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']:>6}/{total_steps}", f"{record['seconds']:7.1f}s"]
    for k, v in record.items():
        if k in ("step", "seconds") or v is None or isinstance(v, (list, dict)):
            continue
        parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


# ======================================================================================
# Evaluation
# ======================================================================================
EVAL_BUDGET = 2 ** 25  # logits held at once by an evaluation chunk (128 MB in fp32): memory stays flat in V


def eval_chunk(model, n_logit_rows_per_example: int = 1, seq_len: int = 2, budget: int = EVAL_BUDGET) -> int:
    """Examples per evaluation chunk so that one chunk's logits (chunk x rows x V) fit the budget and its widest
    activation fits 4x the budget: per example T x 4m (the GPT's MLP hidden, Mamba's in_proj at expand 2) or
    n_head x T x T (attention scores, where SDPA is not fused). Long prompts need the second: in-context G(20,5)
    (T ~ 250) at width 784 has 20,000 held-out graphs and ~2e4 logits each, under one chunk by the first alone.
    A model without a config (a test oracle) is taken to have a 64k vocabulary and width 0."""
    cfg = getattr(model, "cfg", None)
    vocab, width, heads = (getattr(cfg, k, v) for k, v in (("vocab_size", 2 ** 16), ("n_embd", 0), ("n_head", 0)))
    activation = seq_len * max(4 * width, heads * seq_len, 1)  # (elements per example)
    return max(1, min(budget // max(1, n_logit_rows_per_example * vocab), 4 * budget // activation))


@torch.no_grad()
def greedy_generate(model, prefix: torch.Tensor, n_new: int, chunk: int | None = None) -> torch.Tensor:
    """Greedy decoding of n_new tokens after each prefix (B, P) -> (B, n_new). Sequences are a few
    tokens long, so each step re-runs the prefix (no KV cache)."""
    chunk = chunk or eval_chunk(model, seq_len=prefix.shape[1] + n_new)
    outs = []
    for i in range(0, prefix.shape[0], chunk):
        seq = prefix[i: i + chunk]
        for _ in range(n_new):
            last = torch.tensor([seq.shape[1] - 1], device=seq.device)
            nxt = model(seq, last)[:, 0].argmax(-1, keepdim=True)  # (b, 1)
            seq = torch.cat([seq, nxt], 1)
        outs.append(seq[:, prefix.shape[1]:])
    return torch.cat(outs)


@torch.no_grad()
def teacher_forced(model, ts: TokenSet, probe: int | None = None, chunk: int | None = None):
    """Teacher-forced argmax at every loss position (n, A); with `probe` (an answer index, e.g. the
    first hop's) also the cross-entropy and the rank (1 = top) of the true token there: a progress
    signal that moves long before greedy accuracy does."""
    chunk = chunk or eval_chunk(model, len(ts.loss_pos), ts.inputs.shape[1])
    preds, losses, ranks = [], [], []
    for i in range(0, len(ts), chunk):
        logits = model(ts.inputs[i: i + chunk], ts.loss_pos).float()  # (c, A, V)
        preds.append(logits.argmax(-1))
        if probe is not None:
            lp, y = logits[:, probe], ts.labels[i: i + chunk, probe]  # (c, V), (c,)
            losses.append(F.cross_entropy(lp, y, reduction="none"))
            ranks.append((lp > lp.gather(1, y[:, None])).sum(1).float() + 1)
    pred = torch.cat(preds)
    if probe is None:
        return pred, None
    return pred, {"loss": torch.cat(losses).mean().item(), "rank": torch.cat(ranks).mean().item()}


@torch.no_grad()
def sequence_metrics(model, ts: TokenSet, prefix: str = "", teacherless: bool = False, probe: int | None = None,
                     keep_generated: bool = False) -> dict:
    """Free-generation (greedy) exact match and per-position accuracy on a set, plus teacher-forced
    token accuracy (and, with `probe`, the true token's loss and rank at that answer index). For
    teacherless sets every answer is predicted in one pass from the prompt."""
    labels = ts.labels  # (n, A)
    n_ans = labels.shape[1]
    P = int(ts.loss_pos[0]) + 1  # prompt length
    tf_pred, signal = teacher_forced(model, ts, probe)
    gen = tf_pred if teacherless else greedy_generate(model, ts.inputs[:, :P], n_ans)
    # Fractions as hit counts over n in Python floats: a float32 mean puts 45/50 at 0.89999998, under a 0.9 bar
    n = labels.shape[0]
    correct, tf_correct = gen == labels, tf_pred == labels  # (n, A) bool each
    out = {f"{prefix}exact": correct.all(1).sum().item() / n, f"{prefix}tf_token": tf_correct.sum().item() / (n * n_ans)}
    # unrounded: a verdict reads a position (the first hop) against a chance band whose edges are counts over n
    out[f"{prefix}per_position"] = [c / n for c in correct.sum(0).tolist()]
    out[f"{prefix}tf_per_position"] = [c / n for c in tf_correct.sum(0).tolist()]
    if signal is not None:
        out[f"{prefix}probe_loss"], out[f"{prefix}probe_rank"] = signal["loss"], signal["rank"]
    if keep_generated:  # (n, A) tensors for callers that score the generations themselves
        out["generated"], out["teacher_forced"] = gen, tf_pred
    return out


@torch.no_grad()
def edge_metrics(model, g: Graph, direction: str = "both", self_edges: bool = False, device="cpu",
                 chunk: int | None = None) -> dict:
    """Edge memorization from `[EDGE] u` prompts over every node with out-edges:
    top1_valid = the argmax is a true out-neighbour; topk = fraction of u's deg(u) out-neighbours
    among its top-deg(u) predictions (full vocabulary), averaged over nodes (100% = memorized).

    Memory is linear in the degree: instead of comparing top-K index lists with neighbour lists
    (K = the root's degree d, a (chunk, d, d) tensor: 100 GB at d = 5000), each neighbour's logit is
    compared with its row's deg(u)-th largest logit t_u, read off a top-(deg+1) selection; only rows
    whose ties run past it are counted over the full vocabulary. Ties at t_u are shared out as a
    random tie-break would (expected hits), so an all-equal row scores deg/V, not 1."""
    pairs = directed_edges(g, direction, self_edges)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]  # CSR: grouped by source node
    nodes, starts, deg = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    chunk = chunk or eval_chunk(model)
    pairs_t = torch.from_numpy(pairs).to(device)
    edge_tok = special("[EDGE]", g.num_nodes)
    top1_hits, topk_frac = [], []
    for i in range(0, len(nodes), chunk):
        u = torch.from_numpy(nodes[i: i + chunk]).to(device)
        dg = torch.from_numpy(deg[i: i + chunk]).to(device)  # (c,)
        lo, hi = int(starts[i]), int(starts[min(i + chunk, len(nodes)) - 1] + deg[min(i + chunk, len(nodes)) - 1])
        row = torch.repeat_interleave(torch.arange(len(u), device=device), dg)  # (p,) local row of each pair
        v = pairs_t[lo:hi, 1]  # (p,) neighbour ids
        x = torch.stack([torch.full_like(u, edge_tok), u], 1)  # (c, 2)
        logits = model(x, torch.tensor([1], device=device))[:, 0].float()  # (c, V)
        k_top = min(int(dg.max()) + 1, logits.shape[1])
        top_vals, top_idx = logits.topk(k_top, -1)  # (c, k_top) sorted, largest first
        thr = top_vals.gather(1, (dg - 1)[:, None])  # (c, 1) deg(u)-th largest
        above = (top_vals > thr).sum(1)  # (c,) tokens strictly inside the top-deg set (all among the top k_top)
        tied = (top_vals == thr).sum(1)  # (c,) tokens sharing the last slots, exact unless ties run past k_top:
        spill = (top_vals[:, -1] == thr[:, 0]).nonzero()[:, 0]  # rows whose ties may go on (rare: untrained rows)
        if len(spill):
            tied[spill] = (logits[spill] == thr[spill]).sum(1)
        nb_logit = logits[row, v]  # (p,)
        nb_above = torch.zeros_like(dg).index_add_(0, row, (nb_logit > thr[row, 0]).long())
        nb_tied = torch.zeros_like(dg).index_add_(0, row, (nb_logit == thr[row, 0]).long())
        hits = nb_above + nb_tied * (dg - above).float() / tied.float()  # expected hits under a random tie-break
        topk_frac.append(hits / dg.float())
        top = top_idx[:, 0]  # (c,) the argmax
        is_nb = torch.zeros_like(dg).index_add_(0, row, (v == top[row]).long())
        top1_hits.append((is_nb > 0).float())
    return {"edge_top1_valid": torch.cat(top1_hits).double().mean().item(),  # float64: see sequence_metrics
            "edge_topk": torch.cat(topk_frac).double().mean().item()}


def cosine_matrix(X: torch.Tensor | np.ndarray, Y: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    X = torch.as_tensor(X).double()
    Y = X if Y is None else torch.as_tensor(Y).double()
    Xn, Yn = F.normalize(X, dim=-1), F.normalize(Y, dim=-1)
    return (Xn @ Yn.T).numpy()


def geometric_level(E: np.ndarray, pairs: np.ndarray) -> float:
    """Mean cosine similarity of the embeddings of the endpoints of each directed pair."""
    Xn = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(Xn[pairs[:, 0]] * Xn[pairs[:, 1]], 1)))


def token_embeddings(model: nn.Module, num_nodes: int) -> np.ndarray:
    """The node rows of the (input) token-embedding matrix, (N, m) float64 on the host."""
    return model.wte.weight[:num_nodes].detach().double().cpu().numpy()


def estimate_flops_per_step(n_params_non_embedding: int, n_embd: int, n_layer: int, vocab: int,
                            batch: list[tuple[int, int, int]]) -> float:
    """Training FLOPs of one step (forward + backward = 3 x forward), counting the matmuls:
    2 * params * tokens for the blocks, the causal attention scores, and the head at the loss
    positions only. `batch` lists (examples, seq_len, n_loss) per set."""
    flops = 0.0
    for b, T, n_loss in batch:
        flops += 2 * n_params_non_embedding * b * T + 2 * n_layer * b * T * T * n_embd + 2 * n_embd * vocab * b * n_loss
    return 3 * flops


# ======================================================================================
# Run helpers: CLI, seeding, device, outputs, verdict
# ======================================================================================
def arg(default, help: str, choices=None):
    """A Config field with its --help text (and allowed values)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def cli(config_cls, description: str, quick: dict, validate: Callable | None = None, argv=None,
        small: dict | None = None):
    """Build argparse from a Config dataclass (every field a flag, --foo-bar and --foo_bar both
    accepted, bools as --flag/--no-flag), apply the script's preset overrides (`quick`: the seconds-long
    smoke test; `small`: the claim on a 2-core CPU in minutes) to the fields the user did not set when
    --quick / --small is given, and reject bad input with a one-line error (exit 2)."""

    def build(suppress: bool):
        p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                    argument_default=argparse.SUPPRESS if suppress else None)
        p.error = lambda msg: _fail(p.prog, msg)  # one line, exit status 2 (no usage dump)
        for f in dataclasses.fields(config_cls):
            names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
            kw = dict(help=f.metadata.get("help", ""), dest=f.name)
            if not suppress:
                kw["default"] = f.default
            if f.type in (bool, "bool"):
                p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            else:
                typ = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
                p.add_argument(*names, type=typ, choices=f.metadata.get("choices"), **kw)
        return p

    parser = build(False)
    args = vars(parser.parse_args(argv))
    given = vars(build(True).parse_args(argv))
    if args.get("quick") and args.get("small"):
        parser.error("--quick and --small are two different presets; give one")
    for preset, overrides in (("quick", quick), ("small", small or {})):
        if args.get(preset):
            for k, v in overrides.items():
                if k not in given:
                    args[k] = v
    cfg = config_cls(**args)
    if getattr(cfg, "device", "auto") == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available")
    problem = common_problems(cfg) or (validate(cfg) if validate else None)
    if problem:
        parser.error(problem)
    return cfg


MAX_SEED = 2**31 - 1  # numpy's seeds stop at 2**32 - 1: half of that range is left for the scripts' seed offsets


def common_problems(cfg) -> str | None:
    """Checks every script shares: finite numbers, a seed numpy takes (with room for the small offsets the
    scripts add: a control, a second stage, tiny_graphs' --seeds), an --out that is a folder or can be
    made one, a warmup no longer than the run."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            return f"--{f.name.replace('_', '-')} must be a finite number (got {value})"
    if not 0 <= getattr(cfg, "seed", 0) <= MAX_SEED:
        return f"--seed must lie in [0, {MAX_SEED}] (got {cfg.seed})"
    out = getattr(cfg, "out", "")
    if out and os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is an existing file, not a folder"
    parent = os.path.dirname(os.path.abspath(out)) if out else ""
    while parent and not os.path.exists(parent):  # the nearest existing folder above --out must be one
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        return f"--out {out!r} lies below {parent!r}, an existing file"
    if hasattr(cfg, "warmup") and hasattr(cfg, "steps") and cfg.warmup > cfg.steps:
        return f"--warmup {cfg.warmup} is longer than --steps {cfg.steps}"
    return None


def check_ranges(cfg, positive=(), non_negative=(), fraction=()) -> str | None:
    """One-line message for the first field out of range (names as on the command line), else None:
    positive = > 0, non_negative = >= 0, fraction = strictly inside (0, 1)."""
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (fraction, lambda v: 0 < v < 1, "strictly between 0 and 1")):
        for name in names:
            if not ok(getattr(cfg, name)):
                return f"--{name.replace('_', '-')} must be {what} (got {getattr(cfg, name)})"
    return None


def _fail(prog: str, message: str):
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_deterministic(on: bool) -> None:
    """Ask torch for deterministic kernels (or stop asking). On a GPU, kernels that sum with atomic adds (the
    compiled step's embedding gradient, an index_put with accumulation) add in no fixed order, so two runs of one
    seed can part; with this on, torch.compile falls back to torch's sort-based deterministic kernels for them
    and fixes its reduction configs instead of autotuning them.
    warn_only: an op without a deterministic version warns instead of ending the run. cuBLAS reads its
    workspace setting when it first starts, so this must come before the first matmul on the GPU. A CPU
    run is deterministic either way."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


def setup_run(cfg, script: str, deterministic: bool | None = None) -> tuple[str, str]:
    """Seed everything, pick the device, set deterministic kernels on or off (`deterministic` where the script
    fixes it, else cfg.deterministic where the script has the flag, else off), and make the output folder
    (default runs/<script>/)."""
    set_seed(cfg.seed)
    if deterministic is None:
        deterministic = bool(getattr(cfg, "deterministic", False))
    use_deterministic(deterministic)  # set either way: a process may run several
    device = resolve_device(cfg.device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = cfg.out or os.path.join("runs", script)
    os.makedirs(out, exist_ok=True)
    return device, out


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; give them the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    def dump(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
            fh.write("\n")
    _atomic_write(path, dump)


def save_figure(fig, out: str, name: str, pdf: bool = True) -> list[str]:
    """Save a figure as PNG (and PDF) atomically and close it; returns the paths written."""
    paths = []
    for ext in ["png"] + (["pdf"] if pdf else []):
        path = os.path.join(out, f"{name}.{ext}")
        _atomic_write(path, lambda tmp, e=ext: fig.savefig(tmp, dpi=130, bbox_inches="tight", format=e))
        paths.append(path)
    plt.close(fig)
    return paths


def verdict(value: float, threshold: float, criterion: str, higher_is_better: bool = True) -> dict:
    ok = value >= threshold if higher_is_better else value <= threshold
    return {"reproduced": bool(ok), "criterion": criterion, "value": float(value), "threshold": threshold}


# --- "this fails" claims: at chance (two-sided) *and* everything the model was given was learned ---
CHANCE_ALPHA = 1e-3  # two-sided binomial test level for "at chance"
LEARNED = 0.99  # what a model was trained on counts as learned at this accuracy (edges, training paths)


def binomial_tail(hits: int, n: int, p: float, upper: bool = True) -> float:
    """P[Binomial(n, p) >= hits] (upper) or P[Binomial(n, p) <= hits] (lower), in log space."""
    ks = range(hits, n + 1) if upper else range(0, hits + 1)
    if (upper and hits <= 0) or (not upper and hits >= n):
        return 1.0
    if p <= 0 or p >= 1:
        return float((p >= 1) == upper)
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
            for k in ks]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in logs))


def chance_band(n: int, p: float, alpha: float = CHANCE_ALPHA) -> tuple[float, float]:
    """Accuracies (lo, hi) that n guesses at chance p produce with probability >= 1 - alpha: the
    hit counts k with P[X <= k] > alpha/2 and P[X >= k] > alpha/2, X ~ Binomial(n, p), over n."""
    if p <= 0 or p >= 1:
        return float(p >= 1), float(p >= 1)
    k = np.arange(n + 1, dtype=np.float64)
    log_pmf = (math.lgamma(n + 1) - np.vectorize(math.lgamma)(k + 1) - np.vectorize(math.lgamma)(n - k + 1)
               + k * math.log(p) + (n - k) * math.log1p(-p))  # (n+1,) one pass: O(n), not O(n^2)
    pmf = np.exp(log_pmf)
    lower, upper = np.cumsum(pmf), np.cumsum(pmf[::-1])[::-1]  # P[X <= k], P[X >= k]
    ks = np.nonzero((lower > alpha / 2) & (upper > alpha / 2))[0]
    return int(ks.min()) / n, int(ks.max()) / n


def failure_verdict(accuracy: float, n: int, chance: float, learned: dict, claim_text: str,
                    control: float | None = None) -> dict:
    """Verdict of a "this fails" claim: the held-out accuracy (n examples) lies inside the two-sided
    binomial band of chance, AND every precondition in `learned` (name -> measured accuracy of
    something the model was trained on, e.g. edges, training paths) reached LEARNED, AND, when a
    `control` accuracy is given (the same budget without the ablation, on the same n held-out
    examples), the control rose above the band. A model that learned nothing is not evidence of
    failure, one far *below* chance is not "at chance", and a budget under which nothing generalizes
    says nothing about the ablation."""
    lo, hi = chance_band(n, chance)
    testable = hi < 1  # with too few examples the band holds a perfect model too: no result could fail the claim
    at_chance = lo <= accuracy <= hi
    missing = {k: v for k, v in learned.items() if not v >= LEARNED}
    control_ok = control is None or control > hi
    text = (f"{claim_text}: held-out accuracy inside the chance band [{lo:.3g}, {hi:.3g}] (chance {chance:.3g}, "
            f"n={n}, two-sided binomial alpha {CHANCE_ALPHA:g}) while {', '.join(learned)} >= {LEARNED}")
    v = verdict(accuracy, hi, text + ("" if control is None else "; the control (same budget) above the band"),
                higher_is_better=False)
    v.update(reproduced=bool(testable and at_chance and not missing and control_ok), at_chance=bool(at_chance),
             chance_band=[lo, hi], preconditions={k: float(x) for k, x in learned.items()},
             preconditions_met=not missing)
    if control is not None:
        v.update(control=float(control), control_learns=bool(control_ok))
    if not testable:
        v["why_not"] = f"n={n} is too few: the chance band [{lo:.3g}, {hi:.3g}] holds every accuracy up to 1"
    elif missing:
        v["why_not"] = f"not learned: {', '.join(f'{k} {x:.3f}' for k, x in missing.items())}"
    elif not at_chance:
        v["why_not"] = f"accuracy {accuracy:.4g} outside the chance band [{lo:.3g}, {hi:.3g}]"
    elif not control_ok:
        v["why_not"] = f"the control did not generalize either ({control:.4g}): the budget is too small to tell"
    return v


def no_claim(criterion: str) -> dict:
    """The verdict slot of a run that measures something but tests no paper claim (e.g. --bench)."""
    return {"reproduced": None, "criterion": criterion, "value": None, "threshold": None}


SPEED_KEYS = ("train_seconds", "eval_seconds", "steps_per_s", "examples_per_s", "model_tflops_per_s", "mfu",
              "warmup_seconds", "speedup_vs_release", "eval_fraction")


def split_speed(metrics: dict) -> tuple[dict, dict]:
    """Move wall-clock figures (anything timing-dependent, nested dicts too) out of `metrics` into a
    `speed` dict, so that two runs with the same seed and flags have identical metrics."""
    science, speed = {}, {}
    for k, v in metrics.items():
        if k in SPEED_KEYS or k.startswith("seconds"):
            speed[k] = v
        elif isinstance(v, dict):
            science[k], inner = split_speed(v)
            if inner:
                speed[k] = inner
        else:
            science[k] = v
    return science, speed


def write_results(out: str, script: str, claim: str, cfg, device: str, seconds: float, metrics: dict,
                  history: list, result_verdict: dict, speed: dict | None = None, **extra) -> dict:
    """results.json: the science (`metrics`, `history`, `verdict`) and, apart, `speed` (wall clock)."""
    metrics, moved = split_speed(metrics)
    results = {"script": script, "claim": claim, "config": dataclasses.asdict(cfg), "device": device,
               "torch": torch.__version__, "deterministic_kernels": torch.are_deterministic_algorithms_enabled(),
               "seconds": round(seconds, 2), "metrics": metrics,
               "speed": {**moved, **(speed or {})}, "history": history, "verdict": result_verdict, **extra}
    write_json(os.path.join(out, "results.json"), results)
    v = result_verdict
    if v["reproduced"] is None:
        head, value = "NO CLAIM", ""
    else:
        head, value = ("REPRODUCED" if v["reproduced"] else "NOT REPRODUCED"), f" -> measured {v['value']:.4f}"
    why = f" [{v['why_not']}]" if v.get("why_not") and not v["reproduced"] else ""
    print(f"[{script}] {head}: {v['criterion']}{value}{why} ({seconds:.0f} s on {device}); "
          f"wrote {os.path.join(out, 'results.json')}")
    return results


# ======================================================================================
# In-context and tree-star: the in-weights path task on any rooted graph with paths
# (used by freeze_embeddings.py and tree_star.py; training_speed by star_in_context.py too)
# ======================================================================================
def in_weights_path_sets(g: Graph, pauses: int, target: str = "full", direction: str = "both", device="cpu"):
    """(edges, train paths, held-out paths) of the in-weights path task: every edge `[EDGE] u -> v`
    in `direction`, the training paths `[PATH] leaf [PAUSE]*k -> target`, and the held-out paths.
    Train on the first two in mixed batches; evaluate on the third."""
    edges = edge_examples(g, direction, device=device)
    train = path_examples(g.train_paths, g.num_nodes, pauses, target, device, "train")
    test = path_examples(g.test_paths, g.num_nodes, pauses, target, device, "test")
    return edges, train, test


def first_hop_index(target: str, n_answers: int) -> int:
    """Index of the first hop a1 among the answer tokens of a path set built with `target`."""
    return {"first": 0, "full": 1, "reverse": n_answers - 2}[target]


def path_task_metrics(model, ts: TokenSet, target: str, prefix: str = "") -> dict:
    """Greedy exact match and first-hop (a1) accuracy of a path set built with `target` in
    {full, first, reverse}, the greedy and teacher-forced per-position accuracy, and the progress
    signal at a1: the true a1's teacher-forced loss and mean rank (1 = top; chance (V+1)/2)."""
    a1 = first_hop_index(target, ts.labels.shape[1])
    m = sequence_metrics(model, ts, prefix, probe=a1)
    return {f"{prefix}exact": m[f"{prefix}exact"], f"{prefix}first_token": m[f"{prefix}per_position"][a1],
            f"{prefix}per_position": m[f"{prefix}per_position"], f"{prefix}tf_per_position": m[f"{prefix}tf_per_position"],
            f"{prefix}a1_loss": m[f"{prefix}probe_loss"], f"{prefix}a1_rank": m[f"{prefix}probe_rank"]}


def path_task_evaluator(model, g: Graph, train_set: TokenSet, test_set: TokenSet, target: str,
                        direction: str = "both", device="cpu") -> Callable[[], dict]:
    """The evaluation of the in-weights path task, for `train(evaluate=...)`: greedy exact match,
    first-hop and per-position accuracy and the a1 progress signal on the held-out and training
    paths, and edge recovery (edge_topk) in the direction(s) the model was trained on: the
    precondition of a failure claim is that what it was given is memorized."""
    def evaluate() -> dict:
        out = {**path_task_metrics(model, test_set, target, "test_"),
               **path_task_metrics(model, train_set, target, "train_")}
        out.pop("train_tf_per_position")
        out.update(edge_metrics(model, g, direction, device=device))
        return out
    return evaluate


@torch.no_grad()
def path_error_kinds(model, g: Graph, ts: TokenSet, paths: np.ndarray, precision: str = "bf16") -> dict:
    """Where the wrong tokens of a path set go, teacher-forced (the true prefix fed), per answer position.
    `paths` (n, l) are the sets' root-to-leaf paths, row for row. A wrong token is an `echo` of the node
    just fed, another node of its `own_path` (a step skipped or taken back), a `wrong_branch` (another
    neighbour of the node fed, off the path: another arm's a1 at the root, a sibling leaf in a tree),
    `elsewhere` in the graph (also another arm's a1 with the hardest token, whose prompt has no root), or
    `not_a_node`. A memory that knows the arm but not the step errs on the path; one that cannot tell
    neighbours apart errs at branches. `precision`: the evaluations' (bf16 on a GPU), so that the counts match
    the accuracies beside them (in fp32 the GPU headline counted 56 wrong first hops against bf16's 55)."""
    with torch.no_grad(), autocast(ts.inputs.device, precision):
        pred, _ = teacher_forced(model, ts)  # (n, A)
    labels, fed = ts.labels, ts.inputs[:, ts.loss_pos]  # (n, A) each: the target and the token fed before it
    paths = torch.as_tensor(paths, device=pred.device)
    N = g.num_nodes
    directed = torch.as_tensor(np.concatenate([g.edges, g.edges[:, ::-1]]), device=pred.device)  # (2E, 2)
    edge_codes = directed[:, 0] * N + directed[:, 1]  # (2E,) u*N+v < N^2: int64 holds N up to 3e9
    wrong = pred != labels
    echo = wrong & (pred == fed) & (pred < N)  # a special token fed and emitted counts as not a node
    own_path = wrong & ~echo & (paths[:, None, :] == pred[:, :, None]).any(-1)  # (n, A)
    is_node = (pred < N) & (fed < N)
    branch = wrong & ~echo & ~own_path & is_node & torch.isin(fed * N + pred, edge_codes)
    not_node = wrong & (pred >= N)
    per_position = lambda mask: mask.sum(0).tolist()  # noqa: E731
    return {"wrong": per_position(wrong), "echo": per_position(echo), "own_path": per_position(own_path),
            "wrong_branch": per_position(branch), "elsewhere": per_position(wrong & ~echo & ~own_path & ~branch & ~not_node),
            "not_a_node": per_position(not_node)}


def model_flops_per_step(model: nn.Module, sets: list[TokenSet], batch_size: int) -> float:
    """estimate_flops_per_step of one training step of `model` on a mixed batch of `sets` (train()'s shares)."""
    cfg, shares = model.cfg, batch_shares(sets, batch_size)
    return estimate_flops_per_step(count_params(model)["non_embedding"], cfg.n_embd, cfg.n_layer, cfg.vocab_size,
                                   [(b, s.inputs.shape[1], len(s.loss_pos)) for b, s in zip(shares, sets)])


def training_speed(model: nn.Module, sets: list[TokenSet], batch_size: int, steps: int, seconds: float) -> dict:
    """Throughput of a finished `train` run (seconds = its train_seconds, evaluation excluded):
    steps/s, examples/s and the achieved model TFLOP/s from estimate_flops_per_step."""
    shares, seconds = batch_shares(sets, batch_size), max(seconds, 1e-9)
    flops = model_flops_per_step(model, sets, batch_size)
    return {"steps_per_s": round(steps / seconds, 2), "examples_per_s": round(sum(shares) * steps / seconds, 1),
            "model_tflops_per_s": round(flops * steps / seconds / 1e12, 4)}


# ======================================================================================
# Tiny graphs and spectral geometry (tiny_graphs.py, node2vec_spectral.py)
# ======================================================================================
# Spectral convention (App. F): the "negative Laplacian" is the symmetrised random-walk operator
#   M = (D^-1 A - I) + (D^-1 A - I)^T,
# eigenvalues <= ~0; its top eigenvector is the degenerate near-constant one. A graph with c
# connected components (the irregular graph has 2) has c such near-zero, component-constant
# directions: we call them *trivial* and leave them out of every spectral energy fraction.
def connected_components(A: np.ndarray) -> np.ndarray:
    """Component label of every node (symmetric 0/1 adjacency, self-loops ignored)."""
    label = np.full(len(A), -1)
    for start in range(len(A)):
        if label[start] >= 0:
            continue
        label[start], stack = start, [start]
        while stack:
            u = stack.pop()
            for v in np.flatnonzero(A[u]):
                if label[v] < 0:
                    label[v] = start
                    stack.append(v)
    return np.unique(label, return_inverse=True)[1]


def negative_laplacian(A: np.ndarray) -> np.ndarray:
    """(D^-1 A - I) + (D^-1 A - I)^T, the sign-flipped symmetrised random-walk Laplacian (App. F).
    Nodes without edges keep a zero row of D^-1 A."""
    deg = A.sum(1)
    T = A / np.maximum(deg, 1e-12)[:, None]  # D^-1 A
    I = np.eye(len(A))
    return (T - I) + (T - I).T


def laplacian_spectrum(A: np.ndarray):
    """Eigen-decomposition of negative_laplacian(A), sorted by eigenvalue, largest first.
    Returns (evals (N,), evecs (N, N) as columns, trivial (N,) bool). The trivial directions are the
    c eigenvectors (c = number of components) that overlap most with the component indicators:
    robust to the top eigenvalue being slightly above zero on irregular graphs (Remark 6)."""
    evals, evecs = np.linalg.eigh(negative_laplacian(A))
    order = np.argsort(-evals, kind="stable")
    evals, evecs = evals[order], evecs[:, order]
    comp = connected_components(A)
    Q = np.eye(comp.max() + 1)[comp]  # (N, c) component indicators
    Q = Q / np.linalg.norm(Q, axis=0)
    overlap = np.linalg.norm(Q.T @ evecs, axis=0)  # (N,) projection onto span(indicators)
    trivial = np.zeros(len(A), bool)
    trivial[np.argsort(-overlap, kind="stable")[: Q.shape[1]]] = True
    return evals, evecs, trivial


def eigen_projections(E: np.ndarray, evecs: np.ndarray) -> np.ndarray:
    """||E^T e_i|| for every eigenvector e_i (columns of evecs); E is (N, m), not centred.
    The squares sum to ||E||_F^2 because the e_i form an orthonormal basis."""
    return np.linalg.norm(evecs.T @ E, axis=1)


def top_eigen_indices(evals: np.ndarray, trivial: np.ndarray, band: float = 0.1) -> np.ndarray:
    """The "top few" (Fiedler-like) directions: non-trivial eigenvectors whose eigenvalue lies in the
    top `band` fraction of the non-trivial eigenvalue range (so whole eigenspaces, e.g. the cycle's
    Fiedler pair, are never split, and the count adapts to the graph's spectral gaps)."""
    nt = np.flatnonzero(~trivial)  # already sorted by eigenvalue, largest first
    top, low = evals[nt[0]], evals[nt[-1]]
    cut = top - band * (top - low) - 1e-9 * max(1.0, abs(low))
    return nt[evals[nt] >= cut]


def spectral_energy_fraction(proj: np.ndarray, evals: np.ndarray, trivial: np.ndarray, band: float = 0.1) -> float:
    """Share of the embedding energy outside the trivial directions that lies on the top-few
    non-trivial eigenvectors (top_eigen_indices): 1 = only the Fiedler-like directions are used; a
    random matrix gives about (#top)/(N - c)."""
    top = top_eigen_indices(evals, trivial, band)
    nontrivial = (proj[~trivial] ** 2).sum()
    return float((proj[top] ** 2).sum() / max(nontrivial, 1e-30))


def neighbour_targets(pairs: np.ndarray, num_nodes: int) -> np.ndarray:
    """Row-normalised directed training adjacency D^-1 A (N, N) from (u, v) pairs; rows of nodes
    without out-edges are zero. This is each node's next-token target distribution."""
    T = np.zeros((num_nodes, num_nodes))
    np.add.at(T, (pairs[:, 0], pairs[:, 1]), 1.0)
    return T / np.maximum(T.sum(1, keepdims=True), 1e-12)


def topk_recovery(logits: np.ndarray, targets: np.ndarray, exclude_self: bool = False) -> float:
    """Top-k edge recovery for a node-by-node score matrix (N, N): for each node u with k_u > 0
    out-neighbours, the fraction of them among its k_u highest scores; averaged over those nodes.
    exclude_self drops u from its own candidates (Node2Vec without self-edges)."""
    S = np.array(logits, dtype=np.float64)
    if exclude_self:
        np.fill_diagonal(S, -np.inf)
    hits = []
    for u in np.flatnonzero((targets > 0).any(1)):
        nbrs = np.flatnonzero(targets[u] > 0)
        top = np.argsort(-S[u], kind="stable")[: len(nbrs)]
        hits.append(np.isin(nbrs, top).mean())
    return float(np.mean(hits))


def logit_margin(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(margin, top1) of a node-by-node logit matrix on the training pairs: mean over nodes of
    max logit over true neighbours - max logit over non-neighbours; self is in neither set (as in
    the release). top1 = the argmax over the other nodes is a true neighbour. Rows (and columns)
    beyond the targets' size are ignored; columns beyond them count as non-neighbours."""
    n_rows = targets.shape[0]
    margins, top1 = [], []
    for u in range(n_rows):
        nb = np.zeros(logits.shape[1], bool)
        nb[: targets.shape[1]] = targets[u] > 0
        nb[u] = False
        non = ~nb
        non[u] = False
        if nb.any() and non.any():
            margins.append(logits[u, nb].max() - logits[u, non].max())
            row = logits[u].astype(np.float64).copy()
            row[u] = -np.inf
            top1.append(bool(nb[int(np.argmax(row))]))
    return float(np.mean(margins)), float(np.mean(top1))


def skew_middle(E: np.ndarray, W: np.ndarray) -> np.ndarray:
    """B.5 item 4: keep only the diagonal of the middle matrix W in the right-singular basis Vh of
    E: W' = Vh^T diag(diag(Vh W Vh^T)) Vh. The diagonal is the same for W and W^T."""
    _, s, Vh = np.linalg.svd(E, full_matrices=False)
    Vh = Vh[s > s.max() * 1e-10]  # (r, m) directions the embedding actually uses
    diag = np.einsum("ij,jk,ik->i", Vh, W, Vh)  # (r,)
    return Vh.T @ (diag[:, None] * Vh)  # (m, m)


def skew_logits(E: np.ndarray, L: np.ndarray) -> np.ndarray:
    """B.5 item 4 stated on the logits: keep only the diagonal of the node-to-node logits L (N, N) in
    the left-singular basis U of the node embeddings E (N, m): L' = U diag(diag(U^T L U)) U^T.
    For a bias-free middle matrix, L = E W^T E^T, this is exactly E skew_middle(E, W)^T E^T (since
    u_i^T L u_i = s_i^2 (Vh W Vh^T)_ii); it needs no W, so it means the same for every architecture
    and for every way of writing the same logits. Parts of L outside span(U) are dropped (none when
    the N embeddings are linearly independent). Degenerate singular values would leave U, and so L',
    undetermined (one-hot E, for instance); trained and random embeddings generically do not."""
    U, s, _ = np.linalg.svd(E, full_matrices=False)
    U = U[:, s > s.max() * 1e-10]  # (N, r) node-space directions the embedding uses
    diag = np.einsum("ni,nk,ki->i", U, L, U)  # (r,) u_i^T L u_i
    return (U * diag) @ U.T


def geometric_margin(E: np.ndarray, L: np.ndarray, targets: np.ndarray) -> dict:
    """The kit's geometric margin for any tied model: L (N, N) = the model's own logits over the node
    columns for the prompts `[EDGE] u` (rows u), E (N, m) = the node embeddings. 'original' = margin of
    L; 'skewed' = margin of skew_logits(E, L) (> 0: cosine geometry alone stores the edges).
    A function of (E, L) only: how the model splits its map into matrices and biases cannot move it.
    logits_outside_span = ||L - P L P||_F / ||L||_F with P the projector on span(E) (0 when N <= m)."""
    U, s, _ = np.linalg.svd(E, full_matrices=False)
    U = U[:, s > s.max() * 1e-10]
    P = U @ U.T  # (N, N) projector on the span of the embeddings
    (m_orig, t_orig), (m_skew, t_skew) = logit_margin(L, targets), logit_margin(skew_logits(E, L), targets)
    return {"margin_original": m_orig, "margin_skewed": m_skew, "top1_original": t_orig, "top1_skewed": t_skew,
            "logits_outside_span": float(np.linalg.norm(L - P @ L @ P) / max(np.linalg.norm(L), 1e-30))}


def middle_logits(E: np.ndarray, W: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Node-to-node logits E W^T E^T + 1 (E b)^T of a one-matrix model (x -> x W^T + b between tied
    (un)embeddings): the bias adds the same column offset (E b)_v to every row."""
    col_bias = np.zeros(len(E)) if bias is None else E @ bias  # (N,)
    return E @ W.T @ E.T + col_bias[None, :]


def geometric_margin_bias_apart(E: np.ndarray, W: np.ndarray, targets: np.ndarray,
                                bias: np.ndarray | None = None) -> dict:
    """The pre-fix definition, kept only to report (never for a verdict): W replaced by skew_middle,
    the bias b added back unskewed. Not a function of the model: when E c = 1 has a solution (always
    when N <= m), (W + b c^T, 0) gives the same logits as (W, b) but another skewed margin."""
    original = middle_logits(E, W, bias)
    skewed = middle_logits(E, skew_middle(E, W), bias)
    (m_orig, t_orig), (m_skew, t_skew) = logit_margin(original, targets), logit_margin(skewed, targets)
    return {"margin_original": m_orig, "margin_skewed": m_skew, "top1_original": t_orig, "top1_skewed": t_skew}


def effective_middle(E: np.ndarray, H: np.ndarray):
    """Least-squares (min-norm) affine map H ~ E W^T + b from node embeddings E (N, m) to the final
    hidden states H (N, m) a deep model produces for `[EDGE] u`; exact when N <= m + 1. The split
    into W and b is NOT unique when N <= m (b folds into W), so geometric_margin_bias_apart of it is
    reported only, labelled; geometric_margin uses the logits H E^T instead.
    Returns (W (m, m), b (m,), max abs fit error)."""
    X = np.concatenate([E, np.ones((len(E), 1))], 1)  # (N, m + 1)
    sol = np.linalg.lstsq(X, H, rcond=None)[0]  # (m + 1, m)
    return sol[:-1].T, sol[-1], float(np.abs(X @ sol - H).max())


@torch.no_grad()
def edge_prompt_hidden(model: nn.Module, num_nodes: int, device="cpu") -> np.ndarray:
    """Final hidden state (after the last norm, before the head) at the node position of every
    `[EDGE] u` prompt: (N, m) float64."""
    u = torch.arange(num_nodes, device=device)
    x = torch.stack([torch.full_like(u, special("[EDGE]", num_nodes)), u], 1)  # (N, 2)
    return model.hidden(x)[:, 1].double().cpu().numpy()


@torch.no_grad()
def edge_prompt_logits(model: nn.Module, num_nodes: int, device="cpu") -> np.ndarray:
    """The model's next-token logits after `[EDGE] u` over the node columns: (N, N) float64, row u.
    Computed in fp32 (no autocast): bf16 rounding flips small margins."""
    u = torch.arange(num_nodes, device=device)
    x = torch.stack([torch.full_like(u, special("[EDGE]", num_nodes)), u], 1)  # (N, 2)
    with autocast(device, "fp32"):
        return model(x, torch.tensor([1], device=device))[:, 0, :num_nodes].double().cpu().numpy()


class Node2Vec(nn.Module):
    """The 2-layer, 1-hop Node2Vec of §4 / App. F: node embeddings V (N x m) and logits V V^T
    (tied) or U W^T (untied), full softmax over all N nodes. Init N(0, init_std) as nn.Embedding."""

    def __init__(self, num_nodes: int, embedding_dim: int, tied: bool = True, init_std: float = 1.0,
                 dtype=torch.float64):
        super().__init__()
        self.wte = nn.Embedding(num_nodes, embedding_dim, dtype=dtype)  # input embeddings V (or U)
        nn.init.normal_(self.wte.weight, std=init_std)
        self.out = None
        if not tied:
            self.out = nn.Embedding(num_nodes, embedding_dim, dtype=dtype)  # output embeddings W
            nn.init.normal_(self.out.weight, std=init_std)

    def forward(self) -> torch.Tensor:  # the embedding matrix (N, m)
        return self.wte.weight

    def logits(self) -> torch.Tensor:  # (N, N)
        out = self.wte.weight if self.out is None else self.out.weight
        return self.wte.weight @ out.T

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """App. F eq. 1: -sum_u sum_v (D^-1 A)_uv log softmax(V_u . V^T)_v, i.e. the degree-normalised
        cross-entropy over u's neighbours, summed over nodes (as in the release)."""
        return -(targets * torch.log_softmax(self.logits(), -1)).sum()


def TiedNode2Vec(num_nodes: int, embedding_dim: int, **kw) -> Node2Vec:
    return Node2Vec(num_nodes, embedding_dim, tied=True, **kw)


def coefficient_matrix(P: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Lemma 1: C(t) = (D^-1 A - P) + (D^-1 A - P)^T, so that gradient descent on the tied
    Node2Vec loss is V <- V + lr * C V. At near-orthogonal init P ~ I and C(0) ~ negative Laplacian."""
    G = targets - P
    return G + G.T


def train_node2vec(model: Node2Vec, targets: np.ndarray, steps: int, lr: float, record_every: int = 25,
                   record: Callable[[int], dict] | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Plain full-batch gradient descent (no momentum) on Node2Vec.loss; every record_every steps
    (and at the end) a history entry with step, seconds, loss, gradient norm and record(step)."""
    T = torch.as_tensor(targets, dtype=model.wte.weight.dtype, device=model.wte.weight.device)
    params = [p for p in model.parameters()]
    history, start = [], time.time()
    for step in range(steps + 1):
        loss = model.loss(T)
        grads = torch.autograd.grad(loss, params)
        if step % record_every == 0 or step == steps:
            entry = {"step": step, "seconds": round(time.time() - start, 3), "loss": loss.item(),
                     "grad_norm": math.sqrt(sum(float((g ** 2).sum()) for g in grads))}
            entry.update(record(step) if record else {})
            history.append(entry)
            if log and (step % max(record_every, steps // 10) == 0 or step == steps):
                log(progress_line(entry, steps))
        if step == steps:
            break
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return history


def pca_coords(E: np.ndarray, k: int = 3) -> np.ndarray:
    """Top-k principal coordinates of the rows of E (centred SVD), (N, k); zero columns where the
    rank is lower. Signs fixed so the largest |entry| of each column is positive (reproducible)."""
    X = E - E.mean(0, keepdims=True)
    U, s, _ = np.linalg.svd(X, full_matrices=False)
    Y = np.zeros((len(E), k))
    r = min(k, len(s))
    Y[:, :r] = U[:, :r] * s[:r]
    for j in range(r):
        if Y[np.argmax(np.abs(Y[:, j])), j] < 0:
            Y[:, j] *= -1
    return Y


def draw_graph_3d(ax, X: np.ndarray, edges: np.ndarray, title: str = "", root: int | None = None) -> None:
    """Nodes at 3D coordinates X (N, 3) with the undirected edges drawn as lines (root in red)."""
    for u, v in edges:
        ax.plot(*X[[u, v]].T, color="0.55", lw=0.8)
    colors = np.full(len(X), "tab:blue", dtype=object)
    if root is not None:
        colors[root] = "tab:red"
    ax.scatter(*X.T, c=list(colors), s=14, depthshade=False)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])


def draw_projection_bars(ax, evals: np.ndarray, proj: np.ndarray, trivial: np.ndarray, title: str = "") -> None:
    """Fig 7 style: non-trivial eigenvectors by eigenvalue (largest first); green = eigenvalue of
    D^-1A + (D^-1A)^T (= M + 2I) over the largest, orange = ||E^T e_i|| over the largest."""
    keep = np.flatnonzero(~trivial)
    lam = evals[keep] + 2.0
    x = np.arange(len(keep))
    ax.bar(x - 0.2, lam / np.abs(lam).max(), 0.4, color="tab:green", label="eigenvalue (rel.)")
    ax.bar(x + 0.2, proj[keep] / max(proj[keep].max(), 1e-30), 0.4, color="tab:orange", label="projection (rel.)")
    ax.set_xticks(x, [str(i) for i in keep], fontsize=6)
    ax.set_xlabel("eigenvector index (by eigenvalue)", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)
