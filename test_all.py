"""Smoke and unit tests for the kit: `pytest test_all.py` (CPU, a few minutes on 2 cores).

Tests that need CUDA or mamba-ssm are marked and skipped without them."""
import csv
import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import common as C
import freeze_embeddings as FE
import star_in_context as SIC
import sweep
import tiny_graphs as TG
import tree_star as TS

HERE = os.path.dirname(os.path.abspath(__file__))
has_cuda = torch.cuda.is_available()
SPEC_KEYS = {"script", "claim", "config", "device", "seconds", "metrics", "history", "verdict"}
needs_cuda = pytest.mark.skipif(not has_cuda, reason="needs a CUDA device")


# Tiny models gain nothing from a second thread, and an oversubscribed CPU (pytest plus a child
# process, each spinning OpenMP threads) slows them down many times over.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


# Two suites take minutes per test and run only when `-m` names them (`.ci/run` runs both after the unit
# tests): the paper-scale dry runs (`-m paper_scale`, ~10 min) and the reproduction suite (`-m reproduce`, ~25-30 min).
OPT_IN = ("paper_scale", "reproduce")


@pytest.fixture(autouse=True)
def opt_in_suites(request):
    selected = request.config.option.markexpr or ""
    for name in OPT_IN:
        if request.node.get_closest_marker(name) and name not in selected:
            pytest.skip(f"{name} suite (minutes per test): run `pytest test_all.py -m {name}`")
    yield
    C.use_deterministic(False)  # a test that ran a script with --deterministic leaves the process as it found it


def run_script(script, *args, out=None, timeout=600):
    """Run a kit script as a user would; returns (CompletedProcess, results dict or None)."""
    cmd = [sys.executable, os.path.join(HERE, script), *args] + (["--out", str(out)] if out else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE, env=ONE_THREAD)
    path = os.path.join(str(out), "results.json") if out else None
    results = json.load(open(path)) if path and os.path.exists(path) else None
    return proc, results


def run_cmd(args, cwd):
    """Run `python SCRIPT ARGS...` from the folder `cwd` (so nothing lands in the repository)."""
    return subprocess.run([sys.executable, os.path.join(HERE, args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=ONE_THREAD)


def assert_results_shape(res, script):
    for key in ("script", "claim", "config", "device", "seconds", "metrics", "history", "verdict"):
        assert key in res, key
    assert res["script"] == script
    assert set(res["verdict"]) >= {"reproduced", "criterion", "value"}
    assert isinstance(res["verdict"]["reproduced"], bool)
    assert "speed" in res and not any("seconds" in k or k.endswith("_per_s") for k in res["metrics"])


def assert_bad_input(script, args, tmp_path, capsys):
    """Refused by the script's command line, which every script's main runs before any work (its
    `run(cfg)` is never reached): exit status 2, a one-line error, no --out written. In-process, as a child
    process per case costs ~3 s of imports; `test_out_naming_a_file_is_refused` runs each script as a user would."""
    import importlib
    mod = importlib.import_module(script.removesuffix(".py"))
    out = tmp_path / "must_not_exist"
    with pytest.raises(SystemExit) as exc:
        C.cli(mod.Config, "", mod.QUICK, mod.validate, argv=[*args, "--out", str(out)], small=mod.SMALL)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert ": error: " in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------- graphs
@pytest.mark.parametrize("d,l", [(2, 2), (5, 5), (50, 6), (7, 10)])
def test_path_star_invariants(d, l):
    g = C.path_star(d, l, seed=3)
    assert g.num_nodes == d * (l - 1) + 1 and len(g.edges) == d * (l - 1)
    deg = g.degrees()
    assert deg[g.root] == d
    assert sorted(np.unique(g.edges)) == list(range(g.num_nodes))  # labels are a permutation of 0..N-1
    assert g.paths.shape == (d, l) and (g.paths[:, 0] == g.root).all()
    assert (deg[g.leaves] == 1).all() and (l == 2 or (deg[g.paths[:, 1:-1]] == 2).all())
    A = g.adjacency()
    assert all(A[p[i], p[i + 1]] for p in g.paths for i in range(l - 1))  # consecutive nodes are edges
    assert len(np.unique(g.paths[:, 1:])) == d * (l - 1)  # arms are disjoint
    train, test = set(g.train_paths[:, -1]), set(g.test_paths[:, -1])
    assert not train & test and len(train | test) == d and len(train) == int(0.75 * d)


def test_graphs_are_seeded():
    a, b, c = C.path_star(30, 5, seed=1), C.path_star(30, 5, seed=1), C.path_star(30, 5, seed=2)
    assert (a.paths == b.paths).all() and (a.train_paths == b.train_paths).all()
    assert not (a.paths == c.paths).all()


def test_tree_star_counts_and_splits():
    d, k, l = 6, 2, 5
    g = C.tree_star(d, k, l, seed=0, split="leaf")
    assert g.num_nodes == 1 + d * (1 + k + k**2 + k**3) and len(g.edges) == g.num_nodes - 1
    assert g.paths.shape == (d * k ** (l - 2), l) and g.degrees()[g.root] == d
    h = C.tree_star(d, k, l, seed=0, split="first-token")
    assert not set(h.train_paths[:, 1]) & set(h.test_paths[:, 1])  # no shared subtree
    assert len(h.train_paths) + len(h.test_paths) == len(h.paths)


def test_small_graph_families():
    grid, cyc, irr = C.grid_graph(4, 4), C.cycle_graph(15), C.irregular_graph()
    assert (grid.num_nodes, len(grid.edges)) == (16, 24) and sorted(set(grid.degrees())) == [2, 3, 4]
    assert (cyc.num_nodes, len(cyc.edges)) == (15, 15) and (cyc.degrees() == 2).all()
    assert (irr.num_nodes, len(irr.edges)) == (16, 20)
    assert sorted(np.where(irr.degrees() == 3)[0]) == [1, 3, 5, 8, 12, 13, 14, 15]
    for g in (grid, cyc, irr):  # walks follow edges
        A = g.adjacency()
        assert all(A[p[i], p[i + 1]] for p in g.paths for i in range(g.paths.shape[1] - 1))
    both = C.directed_edges(cyc, "both", self_edges=True)
    assert len(both) == 2 * 15 + 15 and len(C.directed_edges(cyc, "forward")) == 15


# ------------------------------------------------------------------------------------- tokens
def test_hardest_token_example():
    g = C.path_star(10, 5, seed=0)
    ts = C.path_examples(g.train_paths, g.num_nodes, pauses=3, target="first")
    assert ts.loss_pos.tolist() == [ts.inputs.shape[1] - 1]  # exactly one loss position, the last
    assert ((ts.targets != -1).sum(1) == 1).all()
    assert (ts.labels[:, 0] == torch.from_numpy(g.train_paths[:, 1])).all()  # it predicts a1
    assert not (ts.inputs == g.root).any()  # the root never appears in the input
    assert (ts.inputs[:, 1] == torch.from_numpy(g.train_paths[:, -1])).all()  # [PATH] leaf [PAUSE]...
    assert (ts.inputs[:, 2:] == C.special("[PAUSE]", g.num_nodes)).all()


def test_full_reverse_and_edge_examples():
    g = C.path_star(4, 5, seed=0)
    full = C.path_examples(g.paths, g.num_nodes, 2, "full")
    assert full.labels.tolist() == g.paths.tolist() and len(full.loss_pos) == 5
    # teacher forcing: after the prompt the input holds root a1 a2 a3 (the leaf is never an input)
    assert full.inputs[:, -4:].tolist() == g.paths[:, :-1].tolist()
    rev = C.path_examples(g.paths, g.num_nodes, 2, "reverse")
    assert rev.labels.tolist() == g.paths[:, ::-1].tolist()
    e = C.edge_examples(g, "both")
    assert len(e) == 2 * len(g.edges) and e.loss_pos.tolist() == [1]
    assert (e.inputs[:, 0] == C.special("[EDGE]", g.num_nodes)).all()
    assert set(map(tuple, torch.stack([e.inputs[:, 1], e.labels[:, 0]], 1).tolist())) == set(
        map(tuple, C.directed_edges(g, "both").tolist()))
    hidden = C.make_token_set("t", np.zeros((3, 4), int), np.ones((3, 2), int), hide_answers_with=99)
    assert (hidden.inputs[:, 4:] == 99).all() and hidden.labels.tolist() == [[1, 1]] * 3


# ------------------------------------------------------------------------------------- models
def tiny_gpt(**kw):
    torch.manual_seed(0)
    return C.GPT(C.GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw))


def test_gpt_shapes_tying_and_init():
    m = tiny_gpt()
    x = torch.randint(0, 30, (3, 7))
    assert m(x).shape == (3, 7, 30) and m(x, torch.tensor([6])).shape == (3, 1, 30)
    assert m.wte.weight is m.lm_head.weight
    assert abs(m.blocks[0].mlp[0].weight.std().item() - 0.02) < 0.005
    u = tiny_gpt(tied=False)
    assert u.wte.weight is not u.lm_head.weight
    assert tiny_gpt(init="unit").wte.weight.std().item() > 0.8  # unit-normal embedding/head init


def test_gpt_ablation_switches():
    x = torch.randint(0, 30, (2, 6))
    no_attn = tiny_gpt(attention=False)
    assert not any(isinstance(mod, C.SelfAttention) for mod in no_attn.modules())
    assert not any(isinstance(mod, torch.nn.LayerNorm) for mod in tiny_gpt(layernorm=False).modules())
    # without attention or positions, each position sees only its own token: permuting the
    # sequence permutes the output
    perm = torch.tensor([3, 1, 0, 5, 2, 4])
    flat = tiny_gpt(attention=False, positions="none")
    assert torch.allclose(flat(x)[:, perm], flat(x[:, perm]), atol=1e-6)
    with_pos = tiny_gpt(attention=False, positions="sinusoidal")
    assert not torch.allclose(with_pos(x)[:, perm], with_pos(x[:, perm]), atol=1e-4)
    learned = tiny_gpt(positions="learned")
    assert learned.wpe.weight.shape == (16, 16)
    # the associative model: logits = E (W E[u] + b) exactly
    assoc = tiny_gpt(attention=False, residual=False, layernorm=False, mlp="linear", positions="none")
    lin = assoc.blocks[0].mlp[0]
    assoc.blocks = assoc.blocks[:1]
    E = assoc.wte.weight
    assert torch.allclose(assoc(x), (lin(E[x])) @ E.T, atol=1e-6)
    # residual on vs off differ for the same weights
    res, nores = tiny_gpt(), tiny_gpt(residual=False)
    nores.load_state_dict(res.state_dict())
    assert not torch.allclose(res(x), nores(x))


@pytest.mark.parametrize("switches", [{}, dict(attention=False), dict(residual=False), dict(layernorm=False),
                                      dict(positions="learned"), dict(positions="none"), dict(tied=False),
                                      dict(mlp="linear")])
def test_merged_sets_same_loss_and_gradients(switches):
    """--merge-sets runs a step's token sets (edges of 2 tokens, paths of 7 or 11) through one forward: the
    same per-example function, so the same loss and gradients as one forward per set, for every ablation
    switch and both path targets; attention must not leak between the sets' examples."""
    g = C.path_star(12, 5, seed=0)
    for target in ("first", "full"):
        sets = C.in_weights_path_sets(g, 5, target)
        batch = [(s.inputs[:7], s.labels[:7], s.loss_pos) for s in sets[:2]]
        torch.manual_seed(1)
        m = C.build_model("gpt", C.vocab_size(g.num_nodes), 2, 16, 2, "cpu", **switches)
        params = [p for p in m.parameters() if p.requires_grad]
        per_set, merged = (C.batch_loss(m, batch, merged) for merged in (False, True))
        for a, b in zip(torch.autograd.grad(per_set, params), torch.autograd.grad(merged, params)):
            assert torch.allclose(a, b, atol=1e-6), switches
        assert abs(per_set.item() - merged.item()) < 1e-5
    # each example's logits are those of its own set alone (the paths do not see the edges, nor rows each other)
    flat = m([(x, pos) for x, _, pos in batch])
    alone = torch.cat([m(x[i:i + 1], pos).flatten(0, 1) for x, _, pos in batch for i in range(len(x))])
    assert flat.shape == alone.shape and torch.allclose(flat, alone, atol=1e-5)


@pytest.mark.parametrize("kind,merged", [("gpt", False), ("gpt", True), ("mamba", False)])
def test_regional_compile_shares_weights_and_traces_one_layer(kind, merged, monkeypatch):
    """--regional-compile: training calls a view of the model whose l layers are compiled. The view shares
    every parameter with the model, which stays eager (evaluation runs it); the loss and gradients are the
    model's; and dynamo traces one graph per token-set shape for all l layers, which is where the compile
    time goes (torch >= 2.5, whose graphs take the parameters as inputs; older torch traces each layer)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(C, "gpu_path", lambda device: True)
    compile_ = torch.compile  # the tracing is what is checked: skip code generation
    monkeypatch.setattr(torch, "compile", lambda model, dynamic=None, mode=None: compile_(model, dynamic=dynamic,
                                                                                          backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    g = C.path_star(12, 5, seed=0)
    batch = [(s.inputs[:8], s.labels[:8], s.loss_pos) for s in C.in_weights_path_sets(g, 5, "first")[:2]]
    torch.manual_seed(0)
    model = C.build_model(kind, C.vocab_size(g.num_nodes), 3, 16, 2, "cpu")
    view = C.try_compile(model, True, "cpu", regional=True)
    layers = "blocks" if kind == "gpt" else "mixers"
    assert view is not model and all(not hasattr(m, "_orig_mod") for m in getattr(model, layers))  # model: eager
    assert [m._orig_mod for m in getattr(view, layers)] == list(getattr(model, layers))
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    losses = [C.batch_loss(fwd, batch, merged) for fwd in (model, view)]
    for a, b in zip(*(torch.autograd.grad(loss, params) for loss in losses)):
        assert torch.allclose(a, b, atol=1e-6)
    assert abs(losses[0].item() - losses[1].item()) < 1e-6
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5):
        assert counters["stats"]["unique_graphs"] == (1 if merged else 2), dict(counters["stats"])  # not 3x


def test_frozen_embeddings_stay_fixed():
    m = tiny_gpt(freeze_embeddings=True)
    before = m.wte.weight.clone()
    tc = C.TrainConfig(steps=1, batch_size=0, lr=1e-2)
    opt = C.make_optimizer(m, tc, "cpu")
    assert all(p is not m.wte.weight for g in opt.param_groups for p in g["params"])
    ts = C.make_token_set("t", np.random.randint(0, 30, (8, 4)), np.random.randint(0, 30, (8, 1)))
    for g in opt.param_groups:
        g["lr"] = 1e-2
    C.batch_loss(m, [(ts.inputs, ts.labels, ts.loss_pos)]).backward()
    opt.step()
    assert torch.equal(m.wte.weight, before) and m.lm_head.weight is m.wte.weight


def test_optimizer_groups_and_schedule():
    m = tiny_gpt()
    for decay_emb in (True, False):
        opt = C.make_optimizer(m, C.TrainConfig(steps=10, batch_size=4, lr=1.0, decay_embeddings=decay_emb), "cpu")
        groups = {g["name"]: g for g in opt.param_groups}
        assert [p is m.wte.weight for p in groups["embedding"]["params"]] == [True]  # the tied head is the same tensor
        assert (groups["embedding"]["weight_decay"] > 0) == decay_emb
        assert id(m.blocks[0].ln_1.weight) in {id(p) for p in groups["body_no_decay"]["params"]}
        assert id(m.blocks[0].attn.qkv.weight) in {id(p) for p in groups["body_decay"]["params"]}
    tc = C.TrainConfig(steps=100, batch_size=4, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert C.lr_at(0, tc) == 0.0 and C.lr_at(10, tc) == 1.0 and math.isclose(C.lr_at(100, tc), 0.1)
    assert all(g["lr"] == 0.0 for g in C.make_optimizer(m, tc, "cpu").param_groups)  # step 0 never runs at peak LR
    mamba = C.build_model("mamba", 30, 1, 16, 1, "cpu")
    opt = C.make_optimizer(mamba, tc, "cpu")
    no_decay = {id(p) for g in opt.param_groups if g["name"] == "body_no_decay" for p in g["params"]}
    assert id(mamba.mixers[0].A_log) in no_decay  # no decay on A_log


def test_embedding_lr_multiplier_moves_only_the_embedding_faster():
    """The lever of the recipe study: the token embedding (tied head) gets embed_lr_mult x the LR."""
    ts = C.make_token_set("t", np.random.RandomState(0).randint(0, 30, (16, 3)), np.random.RandomState(1).randint(0, 30, (16, 1)))
    moved = {}
    for mult in (1.0, 10.0):
        torch.manual_seed(0)
        m = tiny_gpt()
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        tc = C.TrainConfig(steps=1, batch_size=0, lr=1e-3, embed_lr_mult=mult, weight_decay=0.0)
        opt = C.make_optimizer(m, tc, "cpu")
        C.set_lr(opt, 0, tc)
        assert {g["name"]: g["lr"] for g in opt.param_groups}["embedding"] == pytest.approx(1e-3 * mult)
        C.optimizer_step(m, m, opt, [(ts.inputs, ts.labels, ts.loss_pos)], tc, "cpu")
        moved[mult] = {n: (p.detach() - before[n]).abs().max().item() for n, p in m.named_parameters()}
    # Adam's first step moves every weight by ~lr: the embedding 10x further, the body alike
    assert moved[10.0]["wte.weight"] == pytest.approx(10 * moved[1.0]["wte.weight"], rel=1e-3)
    assert moved[10.0]["blocks.0.attn.qkv.weight"] == pytest.approx(moved[1.0]["blocks.0.attn.qkv.weight"], rel=1e-3)


def test_grad_clip_bounds_the_update():
    ts = C.make_token_set("t", np.random.RandomState(0).randint(0, 30, (16, 3)), np.random.RandomState(1).randint(0, 30, (16, 1)))
    norms = {}
    for clip in (0.0, 1e-6):
        torch.manual_seed(0)
        m = tiny_gpt()
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        before = [p.detach().clone() for p in m.parameters()]
        C.optimizer_step(m, m, opt, [(ts.inputs, ts.labels, ts.loss_pos)], C.TrainConfig(1, 0, 1.0, grad_clip=clip), "cpu")
        norms[clip] = math.sqrt(sum(((p.detach() - b) ** 2).sum().item() for p, b in zip(m.parameters(), before)))
    assert norms[1e-6] == pytest.approx(1e-6, rel=1e-2) and norms[0.0] > 1e-3


def test_compile_fallback_covers_the_first_backward(capsys):
    """A compiled module whose *backward* fails (compilation is lazy) must fall back to eager, with
    the weights untouched by the failed attempt and the step redone."""
    m = tiny_gpt()

    class BadBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("backward compile failed")

    class Broken(torch.nn.Module):
        def forward(self, idx, loss_pos=None):
            return BadBackward.apply(m(idx, loss_pos))

    ts = C.make_token_set("t", np.random.RandomState(0).randint(0, 30, (8, 3)), np.random.RandomState(1).randint(0, 30, (8, 1)))
    tc = C.TrainConfig(steps=1, batch_size=0, lr=1e-2)
    opt = C.make_optimizer(m, tc, "cpu")
    C.set_lr(opt, 1, tc)
    loss, fwd = C.guarded_step(Broken(), m, opt, [(ts.inputs, ts.labels, ts.loss_pos)], tc, "cpu")
    err = capsys.readouterr().err
    assert fwd is m and torch.isfinite(loss) and "running eager" in err
    assert all(s["step"] == 1 for s in opt.state.values())  # exactly one optimizer step was applied
    import gpu_check  # whose summary flags such a run by this line
    assert C.COMPILE_FELL_BACK in err and gpu_check.FELL_BACK == C.COMPILE_FELL_BACK


def test_batch_shares_and_sampler_epochs():
    sets = [C.make_token_set(n, np.arange(k)[:, None].repeat(2, 1), np.zeros(k, int)) for n, k in (("e", 900), ("p", 100))]
    assert C.batch_shares(sets, 100) == [90, 10]
    assert C.batch_shares(sets, 0) == [900, 100]
    s = C.Sampler(sets, [90, 10], seed=0)
    batches = [s.next() for _ in range(20)]  # two epochs of each set
    for j, n in ((0, 900), (1, 100)):
        for epoch in (batches[:10], batches[10:]):  # every distinct example exactly once per epoch
            seen = torch.cat([b[j][0][:, 0] for b in epoch])
            assert sorted(seen.tolist()) == list(range(n))
    first, second = torch.cat([b[0][0][:, 0] for b in batches[:10]]), torch.cat([b[0][0][:, 0] for b in batches[10:]])
    assert not torch.equal(first, second)  # reshuffled each epoch
    again = C.Sampler(sets, [90, 10], seed=0)
    assert all(torch.equal(again.next()[0][0], b[0][0]) for b in batches[:5])  # seeded


# ------------------------------------------------------------------------------------- Mamba
def test_selective_scan_function_gradcheck():
    """The scan's hand-written backward against finite differences (fp64, time-major inputs)."""
    g = torch.Generator().manual_seed(0)
    L, b, ed, n = 4, 3, 2, 3
    u, B, C_ = (torch.randn(L, b, k, dtype=torch.float64, generator=g) for k in (ed, n, n))
    delta = torch.rand(L, b, ed, dtype=torch.float64, generator=g)
    A = -torch.rand(ed, n, dtype=torch.float64, generator=g) - 0.5
    args = [t.requires_grad_() for t in (u, delta, A, B, C_)]
    assert torch.autograd.gradcheck(C._SelectiveScan.apply, args)
    one_step = [t[:1].detach().requires_grad_() if t.dim() == 3 else t for t in args]  # L = 1: no decay term
    assert torch.autograd.gradcheck(C._SelectiveScan.apply, one_step)


def naive_selective_scan(u, delta, A, B, C_, D, z, delta_bias):
    """The selective scan straight from its formulas, one time step at a time."""
    delta = torch.nn.functional.softplus(delta + delta_bias[:, None])
    h, ys = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]), []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C_[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + u * D[:, None]) * torch.nn.functional.silu(z)


def test_selective_scan_matches_naive_loop():
    torch.manual_seed(0)
    b, ed, L, n = 2, 3, 6, 4
    kw = dict(dtype=torch.float64)
    args = [torch.randn(b, ed, L, **kw), 0.5 * torch.randn(b, ed, L, **kw), -torch.rand(ed, n, **kw) - 0.5,
            torch.randn(b, n, L, **kw), torch.randn(b, n, L, **kw), torch.randn(ed, **kw), torch.randn(b, ed, L, **kw),
            torch.randn(ed, **kw)]
    args = [t.requires_grad_() for t in args]
    y = C.selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7], delta_softplus=True)
    y_ref = naive_selective_scan(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    for got, ref in zip(torch.autograd.grad((y * w).sum(), args), torch.autograd.grad((y_ref * w).sum(), args)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_causal_depthwise_conv_is_the_cropped_conv1d():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3, dtype=torch.float64)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(C.causal_depthwise_conv(x, conv.weight, conv.bias), conv(x)[..., :5])
    torch.testing.assert_close(C.causal_depthwise_conv(x[..., :1], conv.weight), conv(x[..., :1])[..., :1] - conv.bias[:, None])


def test_mamba_block_causal_init_and_backward():
    torch.manual_seed(0)
    blk = C.MambaBlock(d_model=32, d_state=8)
    x = torch.randn(3, 10, 32, requires_grad=True)
    blk(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in blk.parameters())
    with torch.no_grad():
        x2 = x.detach().clone()
        x2[:, 6] += 1.0
        o1, o2 = blk(x.detach()), blk(x2)
        torch.testing.assert_close(o1[:, :6], o2[:, :6], rtol=0, atol=1e-6)
        assert (o1[:, 6:] - o2[:, 6:]).abs().amax() > 1e-4
    invsp = lambda v: v + math.log(-math.expm1(-v))  # noqa: E731
    assert invsp(1e-3) - 1e-5 <= blk.dt_proj.bias.min() and blk.dt_proj.bias.max() <= invsp(0.1) + 1e-5
    lm = C.build_model("mamba", 40, 2, 16, 1, "cpu")
    assert C.model_backend(lm) == "torch" and lm.wte.weight is lm.lm_head.weight
    bias = lm.mixers[0].dt_proj.bias  # the LM-level init must not zero the dt bias (the release did)
    assert bias.min() > invsp(1e-3) - 1e-5
    assert lm(torch.randint(0, 40, (2, 5)), torch.tensor([4])).shape == (2, 1, 40)
    # out_proj rescaled by 1/sqrt(n_layer) (mamba_ssm's rescale_prenorm_residual): compare with a fresh block
    bound = 1 / math.sqrt(lm.mixers[0].d_inner)  # kaiming-uniform bound of a Linear(d_inner, ...)
    for n_layer in (1, 4):
        deep = C.build_model("mamba", 40, n_layer, 16, 1, "cpu")
        w = deep.mixers[0].out_proj.weight
        assert w.abs().max() <= bound / math.sqrt(n_layer) + 1e-7 and w.abs().max() > 0.8 * bound / math.sqrt(n_layer)
    with pytest.raises(RuntimeError):
        C.make_mamba_mixer(16, 4, 4, 2, "cpu", impl="cuda")


@pytest.mark.skipif(not has_cuda, reason="needs CUDA and mamba-ssm")
def test_mamba_ssm_matches_torch_scan():
    pytest.importorskip("mamba_ssm")
    if not C.mamba_ssm_available("cuda"):
        pytest.skip("mamba_ssm has no CUDA kernel here")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    torch.manual_seed(0)
    b, ed, L, n = 2, 8, 16, 4
    u, delta, z = (torch.randn(b, ed, L, device="cuda") for _ in range(3))
    A, B, C_ = -torch.rand(ed, n, device="cuda"), torch.randn(b, n, L, device="cuda"), torch.randn(b, n, L, device="cuda")
    D, bias = torch.randn(ed, device="cuda"), torch.randn(ed, device="cuda")
    ref = selective_scan_fn(u, delta, A, B, C_, D, z, bias, delta_softplus=True)
    ours = C.selective_scan(u, delta, A, B, C_, D, z, bias, delta_softplus=True)
    torch.testing.assert_close(ours, ref, rtol=6e-4, atol=2e-3)


# ------------------------------------------------------------------------------------- metrics
def test_edge_metrics_on_an_oracle():
    g = C.path_star(6, 4, seed=0)
    A = torch.from_numpy(g.adjacency())
    V = C.vocab_size(g.num_nodes)

    class Oracle(torch.nn.Module):  # logits = adjacency row of the prompted node
        def forward(self, idx, loss_pos=None):
            logits = torch.full((idx.shape[0], idx.shape[1], V), -10.0)
            logits[:, :, : g.num_nodes] = A[idx.clamp(max=g.num_nodes - 1)] * 10
            return logits[:, loss_pos] if loss_pos is not None else logits

    m = C.edge_metrics(Oracle(), g)
    assert m == {"edge_top1_valid": 1.0, "edge_topk": 1.0}


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_edge_metrics_with_ties_match_a_brute_force_count(chunk):
    """Integer logits (many ties, some running past the top-(deg+1) selection) and an all-equal
    model: the expected hits under a random tie-break, counted naively per node."""
    g = C.path_star(5, 4, seed=0)
    V = C.vocab_size(g.num_nodes)
    table = torch.from_numpy(np.random.default_rng(0).integers(0, 3, size=(V, V))).float()

    class Table(torch.nn.Module):  # logits of the last token = a fixed row of small integers
        def forward(self, idx, loss_pos=None):
            return table[idx][:, loss_pos]

    pairs = C.directed_edges(g, "both")
    expected = []
    for u in np.unique(pairs[:, 0]):
        nb, row = pairs[pairs[:, 0] == u, 1], table[u].numpy()
        thr = np.sort(row)[::-1][len(nb) - 1]
        above, tied = (row > thr).sum(), (row == thr).sum()
        expected.append(((row[nb] > thr).sum() + (row[nb] == thr).sum() * (len(nb) - above) / tied) / len(nb))
    m = C.edge_metrics(Table(), g, chunk=chunk)
    assert abs(m["edge_topk"] - np.mean(expected)) < 1e-6
    table.fill_(1.0)  # all equal: a random top-deg set holds deg/V of the neighbours
    degrees = np.unique(pairs[:, 0], return_counts=True)[1]
    assert abs(C.edge_metrics(Table(), g, chunk=chunk)["edge_topk"] - np.mean(degrees / V)) < 1e-6


def test_eval_chunk_bounds_logits_and_activations():
    """Short prompts and large vocabularies: the logits set the chunk (the headline's is unchanged); long prompts at
    a small vocabulary: the activations do (in-context G(20,5), T ~ 250, width 784: all 20,000 graphs in one chunk
    before, 11.4 GB resident at 8,000 graphs and width 128 on the CPU; 2.0 GB with the bound, same metrics)."""
    model = lambda **kw: type("M", (), {"cfg": C.GPTConfig(**kw)})()  # noqa: E731
    assert C.eval_chunk(model(vocab_size=20_008), 1, 8) == C.EVAL_BUDGET // 20_008  # the headline
    long = C.eval_chunk(model(vocab_size=108, n_embd=784, n_head=8), 5, 247)
    assert long * 247 * 4 * 784 <= 4 * C.EVAL_BUDGET < (long + 1) * 247 * 4 * 784 and long < 20_000
    assert C.eval_chunk(model(vocab_size=108, n_embd=16, n_head=8), 1, 4096) * 8 * 4096 ** 2 <= 4 * C.EVAL_BUDGET


def test_sequence_metrics_counts_exact_and_positions():
    class Copy(torch.nn.Module):  # predicts token id (input + 1) everywhere
        def forward(self, idx, loss_pos=None):
            logits = torch.nn.functional.one_hot((idx + 1) % 10, 10).float()
            return logits[:, loss_pos] if loss_pos is not None else logits

    ts = C.make_token_set("t", np.array([[1], [5]]), np.array([[2, 3], [6, 0]]))
    m = C.sequence_metrics(Copy(), ts, "x_")
    assert m["x_exact"] == 0.5 and m["x_per_position"] == [1.0, 0.5]
    # 45 of 50 right is 0.9 exactly, on the bar (a float32 mean gave 0.89999998: a run "not reproduced" at 45/50)
    prompts = np.arange(50)[:, None] % 9
    answers = np.concatenate([prompts[:45] + 1, prompts[45:] + 2])
    m = C.sequence_metrics(Copy(), C.make_token_set("t", prompts, answers))
    assert m["exact"] == 0.9 and m["tf_token"] == 0.9 and C.verdict(m["exact"], 0.9, "")["reproduced"]
    # 3 of 11 is the top of the chance band at n = 11 (chance 1/41): a position rounded to 0.27273 read "outside"
    prompts, answers = np.arange(11)[:, None] % 9, np.arange(11)[:, None] % 9 + 2
    answers[:3] -= 1
    first_hop = C.sequence_metrics(Copy(), C.make_token_set("t", prompts, answers))["per_position"][0]
    assert first_hop == 3 / 11 == C.chance_band(11, 1 / 41)[1]
    assert C.failure_verdict(first_hop, 11, 1 / 41, {}, "")["at_chance"]


def test_geometric_level_and_cosines():
    E = np.array([[1.0, 0], [1, 0.01], [0, 1]])
    assert C.geometric_level(E, np.array([[0, 1]])) > 0.99
    assert abs(C.geometric_level(E, np.array([[0, 2]]))) < 1e-9
    assert np.allclose(np.diag(C.cosine_matrix(E)), 1)


# ------------------------------------------------------------------------------------- star_in_weights end to end
@pytest.mark.parametrize("model", ["gpt", "mamba"])
def test_star_in_weights_quick(model, tmp_path):
    proc, res = run_script("star_in_weights.py", "--quick", "--model", model, "--hardest-token", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_results_shape(res, "star_in_weights")
    assert res["data"]["backend"] == ("sdpa" if model == "gpt" else "torch")
    assert res["metrics"]["edge_topk"] >= 0.95  # the small graph's edges are memorized
    assert (tmp_path / "accuracy.png").exists() and (tmp_path / "geometry.png").exists()
    assert [h["step"] for h in res["history"]][-1] == res["config"]["steps"]


def test_star_in_weights_same_seed_same_result(tmp_path):
    import star_in_weights as S
    runs = []
    for i in range(2):
        cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--quick", "--steps", "100", "--out", str(tmp_path / str(i))])
        runs.append(S.run(cfg))
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]  # noqa: E731
    assert strip(runs[0]["history"]) == strip(runs[1]["history"])
    assert runs[0]["metrics"]["train_loss"] == runs[1]["metrics"]["train_loss"]


def test_deterministic_flag(tmp_path, monkeypatch):
    """--deterministic turns torch's deterministic kernels on for the run and a run without it turns them off
    (one process may run several); on a CPU both give the same science (the CPU sums in a fixed order)."""
    import gpu_check
    import star_in_weights as S
    seen, train = [], C.train
    monkeypatch.setattr(C, "train", lambda *a, **k: (seen.append(torch.are_deterministic_algorithms_enabled()),
                                                     train(*a, **k))[1])
    runs = []  # (the autouse fixture turns deterministic kernels off again after the test, whatever happens)
    for i, flag in enumerate(["--deterministic", "--no-deterministic"]):
        cfg = C.cli(S.Config, "", S.QUICK, S.validate,
                    argv=["--quick", "--hardest-token", "--steps", "60", flag, "--out", str(tmp_path / str(i))])
        runs.append(S.run(cfg))
    assert seen == [True, False] and not torch.are_deterministic_algorithms_enabled()
    assert runs[0]["config"]["deterministic"] and not runs[1]["config"]["deterministic"]
    assert runs[0]["deterministic_kernels"] is True and runs[1]["deterministic_kernels"] is False
    assert gpu_check.first_difference(*map(gpu_check.science, runs)) == ""  # histories, metrics, verdict value


@needs_cuda
def test_deterministic_cuda_same_seed(tmp_path):
    """On a GPU, --deterministic must give one seed the same science twice (compiled, bf16)."""
    runs = [run_script("star_in_weights.py", "--quick", "--hardest-token", "--device", "cuda", "--deterministic",
                       out=tmp_path / str(i)) for i in range(2)]
    assert all(proc.returncode == 0 for proc, _ in runs), runs[0][0].stderr[-2000:]
    import gpu_check
    assert gpu_check.first_difference(*(gpu_check.science(res) for _, res in runs)) == ""


def test_one_held_out_path_gives_no_off_diagonal_geometry(tmp_path):
    """G(4,5) holds out one path: Fig 4's off-diagonal means have no pair to average (None, not NaN)."""
    proc, res = run_script("star_in_weights.py", "--quick", "--degree", "4", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert res["metrics"]["geometry_path_offdiag"] is None and res["metrics"]["geometry_leaf_first_hop_offdiag"] is None
    assert res["metrics"]["geometry_path_diag"] > 0 and "NaN" not in (tmp_path / "results.json").read_text()


def test_star_in_weights_bench_and_staged(tmp_path):
    proc, res = run_script("star_in_weights.py", "--quick", "--bench", "--profile", out=tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    assert res["speed"]["steps_per_s"] > 0 and res["speed"]["examples_per_s"] > 0 and res["metrics"] == {}
    assert res["verdict"]["reproduced"] is None and "NO CLAIM" in proc.stdout  # speed is no paper claim
    profile = res["speed"]["profile"]  # the profiled steps come after the timed ones, with their own table
    assert profile["profiled_steps"] == 10 and profile["ms_per_step"] > 0
    assert "aten::mm" in (tmp_path / "b" / profile["table"]).read_text()
    proc = run_cmd(["star_in_weights.py", "--quick", "--bench", "--bench-steps", "2", "--profile"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # the default --out: the table lands beside results.json
    assert sorted(os.listdir(tmp_path / "runs" / "star_in_weights")) == ["profile.txt", "results.json"]
    proc, res = run_script("star_in_weights.py", "--quick", "--recipe", "staged", "--steps", "50", "--edge-steps", "100", out=tmp_path / "s")
    assert proc.returncode == 0, proc.stderr
    assert res["history"][-1]["step"] == 100 + 50
    seconds = [h["seconds"] for h in res["history"]]
    assert seconds == sorted(seconds)  # one clock across both stages
    assert res["verdict"]["criterion"].startswith("peak test exact")  # full paths: an exact-match verdict
    path_stage = res["history"][-1]  # the speed is the path stage's: its steps over its own seconds
    assert res["speed"]["steps_per_s"] == round(50 / path_stage["train_seconds"], 2)


@pytest.mark.parametrize("edges,reverse,success", [("both", False, True), ("forward", False, False),
                                                    ("backward", False, False), ("both", True, True),
                                                    ("backward", True, True), ("forward", True, False)])
def test_star_in_weights_edge_direction_claims(edges, reverse, success):
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--edges", edges] + (["--reverse-path"] if reverse else []))
    claim, expect_success = S.claim_of(cfg)
    assert expect_success == success and ("Fig 33" in claim) == (not success)


@pytest.mark.parametrize("args", [["--degree", "1"], ["--path-length", "1"], ["--train-ratio", "1.2"],
                                  ["--width", "65", "--heads", "4"], ["--pauses", "80"], ["--model", "rnn"],
                                  ["--hardest-token", "--reverse-path"], ["--steps", "ten"],
                                  ["--no-tied", "--freeze-embeddings"], ["--profile"]])
def test_star_in_weights_bad_input(args, tmp_path, capsys):
    assert_bad_input("star_in_weights.py", args, tmp_path, capsys)


# The GPU path's code (bf16 autocast, fused AdamW, torch.compile) run on the CPU: CI has no GPU, and
# a dtype clash under autocast, a compile failure or an unfused optimizer would otherwise first show
# on a lent GPU. Each case: (script module, its flags after --quick).
GPU_PATH_CASES = {
    "gpt_full_path": ("star_in_weights", ["--steps", "12", "--warmup", "4", "--eval-every", "6"]),
    "gpt_deterministic": ("star_in_weights", ["--hardest-token", "--deterministic", "--steps", "12", "--warmup", "4",
                                              "--eval-every", "6"]),
    "gpt_merged_sets": ("star_in_weights", ["--merge-sets", "--steps", "12", "--warmup", "4", "--eval-every", "6"]),
    "gpt_bench": ("star_in_weights", ["--hardest-token", "--bench", "--bench-steps", "3"]),
    "gpt_bench_cuda_graphs": ("star_in_weights", ["--hardest-token", "--bench", "--bench-steps", "3",
                                                  "--compile-mode", "reduce-overhead", "--profile"]),
    "gpt_regional": ("star_in_weights", ["--hardest-token", "--regional-compile", "--stop-at", "0.99", "--steps", "12",
                                         "--warmup", "4", "--eval-every", "6"]),  # train(), evaluation eager
    "gpt_regional_merged_cuda_graphs": ("star_in_weights", ["--hardest-token", "--bench", "--bench-steps", "3",
                                                            "--compile-mode", "reduce-overhead", "--regional-compile",
                                                            "--merge-sets"]),
    "mamba": ("star_in_weights", ["--hardest-token", "--model", "mamba", "--layers", "1", "--steps", "4",
                                  "--warmup", "2", "--eval-every", "2"]),  # one layer: dynamo unrolls the scan
    "freeze_embeddings": ("freeze_embeddings", ["--steps", "8", "--warmup", "4", "--eval-every", "4"]),
    "tree_star": ("tree_star", ["--steps", "8", "--warmup", "4", "--eval-every", "4"]),
    "star_in_context": ("star_in_context", ["--steps", "8", "--warmup", "4", "--eval-every", "4"]),
}


INDUCTOR_CASES = ("gpt_full_path", "gpt_deterministic")  # through inductor (deterministic: its fallbacks)


def _cpu_has_fused_adamw() -> bool:
    """Fused AdamW on the CPU came with torch 2.4; requirements.txt admits 2.2 (fused on CUDA since 2.0)."""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_has_fused_adamw(), reason="this torch has no fused AdamW on the CPU (needs >= 2.4)")
@pytest.mark.parametrize("case", list(GPU_PATH_CASES))
def test_gpu_path_on_cpu(case, tmp_path, monkeypatch, capfd):
    """Each GPU-default script's training, evaluation and outputs with C.gpu_path forced on, on the
    CPU: autocast to bf16, fused AdamW and torch.compile as on CUDA. The compiled model must really
    be used (no fallback to eager) and every optimizer fused. Two cases go through inductor's CPU
    code generation; the others stop after dynamo and AOTAutograd (backend "aot_eager": the tracing
    that a GPU shares with the CPU, where graph breaks and tracing errors come from; inductor's GPU
    code is Triton, which a CPU cannot check anyway), which keeps CI minutes down."""
    import importlib
    import shutil
    name, args = GPU_PATH_CASES[case]
    script = importlib.import_module(name)
    torch._dynamo.reset()
    monkeypatch.setattr(C, "gpu_path", lambda device: True)
    if case not in INDUCTOR_CASES:
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, dynamic=None, mode=None: compile_(
            model, dynamic=dynamic, backend="aot_eager"))
    fused, compiled, regional_asked = [], [], []
    make_optimizer, try_compile = C.make_optimizer, C.try_compile

    def spy_optimizer(*a, **k):
        opt = make_optimizer(*a, **k)
        fused.append(opt.defaults["fused"])
        return opt

    def spy_compile(model, enabled, device, mode="default", regional=False):
        out = try_compile(model, enabled, device, mode, regional)
        if enabled:  # (freeze_embeddings' associative part asks for eager)
            compiled.append(out is not model)
            regional_asked.append(regional)
        return out

    monkeypatch.setattr(C, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(C, "try_compile", spy_compile)
    cfg = C.cli(script.Config, "", script.QUICK, script.validate, small=script.SMALL,
                argv=["--quick", "--device", "cpu", "--out", str(tmp_path), *args])
    script.run(cfg)
    err = capfd.readouterr().err
    res = json.load(open(tmp_path / "results.json"))
    assert res["device"] == "cpu" and fused and all(fused), (fused, err[-500:])
    assert compiled and all(compiled), compiled
    assert all(regional_asked) == ("--regional-compile" in args), regional_asked  # the flag reaches try_compile
    if case not in INDUCTOR_CASES or shutil.which("g++") or shutil.which("c++"):  # inductor's CPU code needs one
        assert C.COMPILE_FELL_BACK not in err, err[-1000:]
    precision = res.get("precision") or res.get("data", {}).get("precision")
    bf16 = [precision] if isinstance(precision, str) else [v for v in (precision or {}).values()]
    assert "bf16-autocast" in bf16, precision
    if "--bench" not in args:
        assert res["history"] and all(math.isfinite(r.get("train_loss") or 0.0) for r in res["history"]), res["history"]


def test_gpu_check_plan_parses_as_each_script_would():
    """Every command of the prepared GPU session passes its script's own flag parsing and validation
    (with --device cpu here), so no device time is lost on a typo."""
    import importlib
    import gpu_check
    runs = [r for rehearsal in (False, True) for stage in gpu_check.STAGES
            for _, group, _ in gpu_check.plan("/tmp/x", rehearsal, stage) for r in group]
    checked = 0
    for name, argv in runs:
        if not argv[1].endswith(".py"):
            continue
        script = importlib.import_module(os.path.basename(argv[1])[:-3])
        args = ["cpu" if a == "cuda" else a for a in argv[2:]]
        cfg = C.cli(script.Config, "", script.QUICK, script.validate, small=script.SMALL, argv=args)
        assert cfg.out.endswith(name), (name, cfg.out)
        checked += 1
    assert checked == 2 * (len(gpu_check.SMOKE) + len(gpu_check.BENCH) + 1 + len(gpu_check.PROFILE)
                           + len(gpu_check.SAME_SEED) + len(gpu_check.GOAL) + sum(map(len, gpu_check.FULL.values())))
    assert set(gpu_check.FULL) | {1, 2, 3} == set(gpu_check.STAGES) and gpu_check.NEXT_STAGE in gpu_check.STAGES
    headline = next(a for n, a in runs if n == "headline")
    assert headline[2:-2] == ["--hardest-token", "--device", "cuda", "--degree", "5000"]  # the README's command


def test_gpu_check_plan_prints_each_run_its_own_cache(capsys):
    import gpu_check
    assert gpu_check.main(["--plan", "--stage", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[goal] ")]
    assert len(lines) == len(gpu_check.GOAL) and "{name}" not in "".join(lines)
    for (name, *_), line in zip(gpu_check.GOAL, lines):  # the cache each run starts empty in, as run_group sets it
        assert line.endswith(f"inductor_cache_{name}'}})"), line


def test_gpu_check_rehearsal_and_caps(tmp_path):
    """The driver's plumbing on the CPU: a rehearsal of two runs writes the three files it promises;
    a run past its cap is stopped and marked, one not yet started is reported as such."""
    import gpu_check
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--cpu-rehearsal", "--stage", "1",
                           "--only", "env,node2vec_spectral", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=300, cwd=HERE, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["runs.tar.gz", "summary.json", "summary.md"]
    summary = json.load(open(out / "summary.json"))
    assert [(r["name"], r["status"]) for r in summary] == [("env", "rc=0"), ("node2vec_spectral", "rc=0")]
    assert summary[1]["reproduced"] is True and "| smoke | node2vec_spectral | rc=0 |" in proc.stdout
    proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--cpu-rehearsal", "--stage", "2",
                           "--only", "bench_profile_cuda_graphs", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=300, cwd=HERE, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]  # the profiled bench, and its per-step counts in the table
    assert "| profile | bench_profile_cuda_graphs | rc=0 |" in proc.stdout and "profiled: profiled_steps 10" in proc.stdout
    proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu_check.py"), "--cpu-rehearsal", "--stage", "2",
                           "--only", "same_seed_a,same_seed_b", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=300, cwd=HERE, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]  # one seed twice, compared from the two results.json
    assert "same_seed: same seed twice: identical science" in proc.stdout, proc.stdout[-2000:]
    echo = [sys.executable, "-c", "import os; print(os.environ['CACHE'])"]  # "{name}": each run its own value
    gpu_check.run_group([("x", echo), ("y", echo)], {"CACHE": "cache_{name}"}, 60.0, str(work), parallel=2)
    assert [open(work / n / "log.txt").read().split("\n")[1] for n in "xy"] == ["cache_x", "cache_y"]
    fell = gpu_check.describe({"phase": "goal", "name": "x", "status": "rc=0", "seconds": 1.0}, str(work))
    assert not fell["compile_fell_back"] and "fell" not in gpu_check.table([fell])
    with open(work / "x" / "log.txt", "a") as log:
        log.write(f"{C.COMPILE_FELL_BACK} at the first step (RuntimeError: ...); running eager\n")
    fell = gpu_check.describe({"phase": "goal", "name": "x", "status": "rc=0", "seconds": 1.0}, str(work))
    assert "x: torch.compile failed and the run went on eager" in gpu_check.table([fell])
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    done = gpu_check.run_group([("a", sleeper), ("b", sleeper)], {}, 2.0, str(work), parallel=1)
    assert [(r["name"], r["status"]) for r in done] == [("a", "cap"), ("b", "not started (cap)")]
    assert done[0]["seconds"] < 10
    # one run's own cap in a one-by-one phase: a hung run stops at it and the next one still runs
    quick = [sys.executable, "-c", "print('done')"]
    done = gpu_check.run_group([("a", sleeper), ("b", quick)], {}, 30.0, str(work), parallel=1, run_cap=2.0)
    assert [(r["name"], r["status"]) for r in done] == [("a", "cap"), ("b", "rc=0")] and done[0]["seconds"] < 10
    with open(work / "x" / "log.txt", "a") as log:  # warnings the summary names
        log.write("UserWarning: skipping cudagraphs due to mutated inputs\n")
    warned = gpu_check.describe({"phase": "goal", "name": "x", "status": "rc=0", "seconds": 1.0}, str(work))
    assert warned["compile_skipped_cudagraphs"] and not warned["nondeterministic_kernel_warned"]
    assert "x: its log warns 'skipping cudagraphs'" in gpu_check.table([warned])


def test_gpu_check_keeps_the_runs_when_the_summary_fails(tmp_path, monkeypatch):
    import gpu_check
    monkeypatch.setattr(gpu_check, "table", lambda runs: 1 / 0)
    out = tmp_path / "out"
    assert gpu_check.main(["--cpu-rehearsal", "--stage", "1", "--only", "env", "--out", str(out),
                           "--work", str(tmp_path / "work")]) == 0
    assert sorted(os.listdir(out)) == ["runs.tar.gz", "summary.json", "summary.md"]
    assert "ZeroDivisionError" in (out / "summary.md").read_text()


def test_gpu_check_same_seed_comparison():
    """The summary says whether one seed's two runs agree, and if not, where they first part; wall-clock
    figures do not count."""
    import gpu_check

    def run(name, loss, seconds, value=0.5):
        res = {"history": [{"step": 0, "seconds": 0.0, "train_loss": None},
                           {"step": 150, "seconds": seconds, "train_loss": loss, "train_seconds": seconds}],
               "metrics": {"test_first_token": value}, "verdict": {"value": value}}
        return {"phase": "determinism", "name": name, "status": "rc=0", "seconds": seconds, "last_line": "",
                "science": gpu_check.science(res), "speed": {"steps_per_s": 30.0}}

    same = gpu_check.table([run("same_seed_a", 2.5, 10.0), run("same_seed_b", 2.5, 11.0)])
    assert "same_seed: same seed twice: identical science (2 evaluations" in same
    parted = gpu_check.table([run("same_seed_a", 2.5, 10.0), run("same_seed_b", 2.4999, 10.0)])
    assert "same_seed: same seed twice: DIFFER, first at step 150: train_loss 2.5 against 2.4999" in parted
    final = gpu_check.table([run("deterministic_a", 2.5, 10.0), run("deterministic_b", 2.5, 10.0, value=0.6)])
    assert "DIFFER, first at the final metrics" in final
    # the steps/s of a 300-step run is mostly its compile: the rate after the first evaluation is shown beside it
    assert gpu_check.steady_rate([{"step": 0, "seconds": 0.0}, {"step": 150, "seconds": 60.0},
                                  {"step": 300, "seconds": 65.0}]) == 30.0
    assert gpu_check.steady_rate([{"step": 0, "seconds": 0.0}, {"step": 150, "seconds": 60.0}]) is None
    missing = {"phase": "determinism", "name": "same_seed_b", "status": "cap", "seconds": 150.0, "last_line": ""}
    assert "the second run of the seed has no results.json (cap)" in gpu_check.table([run("same_seed_a", 2.5, 1.0),
                                                                                       missing])


def test_gpu_check_samples_the_gpu(tmp_path, monkeypatch):
    """The sampler reads nvidia-smi through a call (here a stand-in that prints one reading) and the summary
    gives each phase's readings; without nvidia-smi it stops at once and the summary says nothing."""
    import threading
    import gpu_check
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '87, 1980, [N/A], 61'\n")
    fake.chmod(0o755)
    for path_env, expect_rows in ((f"{fake.parent}{os.pathsep}{os.environ['PATH']}", True), ("/nonexistent", False)):
        monkeypatch.setenv("PATH", path_env)
        stop, readings = threading.Event(), tmp_path / "samples.csv"
        t0 = time.time()
        sampler = threading.Thread(target=gpu_check.sample_gpu, args=(stop, str(readings), 0.05))
        sampler.start()
        time.sleep(0.5)
        stop.set()
        sampler.join(timeout=10)
        rows = gpu_check.gpu_rows(str(readings), [("full", t0, time.time()), ("later", time.time() + 1, time.time() + 2)])
        if expect_rows:
            assert len(rows) == 1 and rows[0].startswith("full: GPU utilization mean 87% over "), rows
            assert "SM clock 1980-1980 MHz" in rows[0] and "temperature up to 61 C" in rows[0]
            assert "power" not in rows[0]  # "[N/A]" is no reading
        else:
            assert rows == [] and readings.read_text().count("\n") == 1  # the header only


def test_gpu_check_reads_the_kit_progress_lines():
    """A run stopped at its cap has no results.json: gpu_check reads its curve off the progress lines,
    so its pattern must match what common.progress_line writes; the summary says when 0.95 came."""
    import gpu_check
    records = [{"step": 0, "epoch": 0.0, "seconds": 0.0, "train_loss": None, "test_first_token": 0.0},
               {"step": 250, "epoch": 11.7, "seconds": 12.5, "train_loss": 2.1, "test_first_token": 0.97, "edge_topk": 1.0}]
    lines = [C.progress_line(r, 4000) for r in records]
    parsed = [m.groups() for m in map(gpu_check.PROGRESS.search, lines)]
    assert [(int(a), float(b), float(c)) for a, b, c in parsed] == [(0, 0.0, 0.0), (250, 12.5, 0.97)], lines
    run = {"phase": "headline", "name": "headline", "status": "cap", "seconds": 330.0, "last_line": lines[-1],
           "history": [{"step": int(a), "seconds": float(b), "test_first_token": float(c)} for a, b, c in parsed]}
    assert "headline reached 0.95: step 250, 12 s into training" in gpu_check.table([run])


def test_gpu_check_levers_against_their_base():
    """Stage 2's and 3's summary sets each lever's run beside its base (the longest name that prefixes its
    own in its phase), so that the next session reads off what to make the default."""
    import gpu_check

    def run(phase, name, steps_per_s, warmup, to_95=None, wall=100.0):
        speed = {"steps_per_s": steps_per_s, "warmup_seconds": warmup, "seconds_to_95pct": to_95}
        return {"phase": phase, "name": name, "status": "rc=0", "seconds": wall, "last_line": "", "speed": speed}
    rows = gpu_check.lever_rows([run("profile", "bench_profile", 29.2, 5.0),
                                 run("profile", "bench_profile_cuda_graphs", 63.5, 52.0),
                                 run("profile", "bench_profile_cuda_graphs_regional", 50.1, 20.3),
                                 run("goal", "goal", 55.0, 60.0, 80.0, 150.0),
                                 run("goal", "goal_regional", 45.0, 25.0, 90.0, 120.0)])
    assert rows[0] == "\nEach lever against its base:" and len(rows) == 4, rows
    assert ("bench_profile_cuda_graphs_regional against bench_profile_cuda_graphs: steps_per_s 50.1 against 63.5, "
            "warmup_seconds 20.3 against 52.0") in rows
    assert "bench_profile_cuda_graphs against bench_profile: steps_per_s 63.5 against 29.2, warmup_seconds 52.0 against 5.0" in rows
    assert ("goal_regional against goal: steps_per_s 45.0 against 55.0, warmup_seconds 25.0 against 60.0, "
            "seconds_to_95pct 90.0 against 80.0, wall s 120.0 against 150.0") in rows
    assert gpu_check.lever_rows([run("goal", "goal", 55.0, 60.0)]) == []


def test_compile_modes_are_torch_compile_modes():
    m = tiny_gpt()
    for mode in C.COMPILE_MODES:  # torch.compile checks the mode when it wraps (it compiles lazily)
        torch.compile(m, dynamic=False, mode=mode)
    with pytest.raises(ValueError):
        C.try_compile(m, True, "cpu", mode="fastest")


@needs_cuda
def test_star_in_weights_quick_cuda(tmp_path):
    proc, res = run_script("star_in_weights.py", "--quick", "--device", "cuda", "--compile", out=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert res["device"] == "cuda" and res["metrics"]["edge_topk"] >= 0.95


# ===================================================================================== tiny graphs, spectral (issue 4)
# ---------------------------------------------------------------------------------------------- metrics
def test_topk_recovery():
    g = C.path_star(3, 4, seed=0)
    targets = C.neighbour_targets(C.directed_edges(g), g.num_nodes)
    A = g.adjacency()
    assert C.topk_recovery(A, targets) == 1.0
    # self gets the highest score: with self a candidate one neighbour slot is lost, without it all fit
    self_heavy = A + 5 * np.eye(g.num_nodes)
    assert C.topk_recovery(self_heavy, targets) < 1.0
    assert C.topk_recovery(self_heavy, targets, exclude_self=True) == 1.0
    assert C.topk_recovery(-A, targets, exclude_self=True) == 0.0


def test_c0_is_minus_laplacian_at_near_orthogonal_init():
    for g in [C.cycle_graph(15), C.irregular_graph()]:
        torch.manual_seed(0)
        model = C.TiedNode2Vec(g.num_nodes, 100)  # N(0, 1): diagonal of V V^T ~ 100, off-diagonal ~ 10
        targets = C.neighbour_targets(C.directed_edges(g), g.num_nodes)
        P = torch.softmax(model.logits(), -1).detach().numpy()
        C0 = C.coefficient_matrix(P, targets)
        L = -C.negative_laplacian(g.adjacency())
        assert np.linalg.norm(C0 + L) / np.linalg.norm(L) < 1e-6


def test_node2vec_gradient_is_minus_C_V():
    """Lemma 1: the gradient of the tied Node2Vec loss is -C V."""
    g = C.grid_graph(3, 3)
    torch.manual_seed(0)
    model = C.TiedNode2Vec(9, 5, init_std=0.5)
    targets = C.neighbour_targets(C.directed_edges(g), 9)
    (grad,) = torch.autograd.grad(model.loss(torch.as_tensor(targets)), [model.wte.weight])
    P = torch.softmax(model.logits(), -1).detach().numpy()
    V = model().detach().numpy()
    assert np.allclose(grad.numpy(), -C.coefficient_matrix(P, targets) @ V, atol=1e-10)


def test_eigen_projections_sum_to_energy_and_trivial_directions():
    rng = np.random.default_rng(0)
    for g in [C.cycle_graph(15), C.path_star(4, 5), C.grid_graph(4, 4), C.irregular_graph()]:
        evals, evecs, trivial = C.laplacian_spectrum(g.adjacency())
        E = rng.normal(size=(g.num_nodes, 7))
        assert np.isclose((C.eigen_projections(E, evecs) ** 2).sum(), (E ** 2).sum())
        assert trivial.sum() == (2 if g.name.startswith("irregular") else 1)
        assert np.all(evals <= 0.3) and np.all(np.diff(evals) <= 1e-12)
    evals, evecs, trivial = C.laplacian_spectrum(C.cycle_graph(15).adjacency())
    top = C.top_eigen_indices(evals, trivial)
    assert list(top) == [1, 2]  # the cycle's Fiedler pair, never split
    fiedler_only = evecs[:, top] @ rng.normal(size=(2, 5))
    assert np.isclose(C.spectral_energy_fraction(C.eigen_projections(fiedler_only, evecs), evals, trivial), 1.0)


# ---------------------------------------------------------------------------------------------- scripts
def test_node2vec_spectral_quick_end_to_end(tmp_path):
    out = tmp_path / "n2v"
    proc = run_cmd(["node2vec_spectral.py", "--quick", "--device", "cpu", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    s = res["metrics"]["cycle_15"]
    assert res["deterministic_kernels"] is True  # no flag: always on (same seed, same spectra on a GPU too)
    assert (out / "fig8_summary.png").exists() and (out / "spectral_cycle_15.png").exists()
    assert s["C0_vs_minus_L"] < 1e-6 and s["final_grad_norm"] < s["initial_grad_norm"]
    assert s["final_energy_top"] > s["initial_energy_top"]


def test_bad_input_exits_2_without_traceback(tmp_path):
    for args in (["tiny_graphs.py", "--graphs", "moon"], ["node2vec_spectral.py", "--degree", "1"]):
        proc = run_cmd(args + ["--out", str(tmp_path / "bad")], tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr
        assert not (tmp_path / "bad").exists()


def test_help_documents_every_flag(tmp_path):
    for script, flag in (("tiny_graphs.py", "--study"), ("node2vec_spectral.py", "--band")):
        proc = run_cmd([script, "--help"], tmp_path)
        assert proc.returncode == 0 and flag in proc.stdout and "Traceback" not in proc.stderr


# ===================================================================================== in-context, frozen, tree-star (issue 5)
# ------------------------------------------------------------------ in-context prompt format and masks
def test_in_context_prompt_format():
    d, l, N, n = 3, 5, 30, 200
    prefix, path = SIC.sample_in_context_graphs(n, d, l, N, np.random.default_rng(0))
    E = d * (l - 1)
    assert prefix.shape == (n, 3 * E + 3) and path.shape == (n, l)
    bar, slash, eq = C.special("|", N), C.special("/", N), C.special("=", N)
    first_edge_from_source = 0
    for p, q in zip(prefix, path):
        body = p[: 3 * E].reshape(E, 3)
        assert (body[:-1, 2] == bar).all() and body[-1, 2] == slash  # u v | ... u v /
        assert p[-3] == q[0] and p[-2] == q[-1] and p[-1] == eq  # / source goal =
        edges = body[:, :2]
        assert (edges < N).all() and len(np.unique(edges)) == E + 1  # labels distinct per graph
        assert len({tuple(e) for e in edges.tolist()}) == E
        assert (edges[:, 0] == q[0]).sum() == d  # the source has d children
        for a, b in zip(q[:-1], q[1:]):  # the target path follows the edges source -> goal
            assert [a, b] in edges.tolist()
        assert q[-1] not in edges[:, 0]  # the goal is a leaf
        first_edge_from_source += int(edges[0, 0] == q[0])
    assert first_edge_from_source < n * 0.6  # the edge list is shuffled (in order it would always start at the source)


def test_in_context_masks_and_teacherless_inputs():
    d, l, N = 2, 5, 20
    prefix, path = SIC.sample_in_context_graphs(16, d, l, N, np.random.default_rng(1))
    P = prefix.shape[1]
    sets = {m: SIC.make_mode_set(m, prefix, path, N, "cpu", "t") for m in SIC.MODES}
    nt, a1 = sets["next-token"]
    assert a1 == 1 and nt.loss_pos.tolist() == list(range(P - 1, P - 1 + l))
    assert (nt.targets[:, : P - 1] == -1).all()  # no loss on the prompt
    assert torch.equal(nt.labels, torch.from_numpy(path))
    assert torch.equal(nt.inputs[:, P:], torch.from_numpy(path[:, :-1]))  # teacher forcing
    tl, _ = sets["teacherless"]
    assert torch.equal(tl.targets, nt.targets) and torch.equal(tl.inputs[:, :P], nt.inputs[:, :P])
    assert (tl.inputs[:, P:] == C.special("$", N)).all()  # the target is hidden from the inputs
    rev, a1r = sets["reverse"]
    assert torch.equal(rev.labels, torch.from_numpy(path[:, ::-1].copy())) and rev.labels[0, a1r] == path[0, 1]
    ft, a1f = sets["first-token"]
    assert ft.labels.shape == (16, 1) and torch.equal(ft.labels[:, 0], torch.from_numpy(path[:, 1])) and a1f == 0
    assert ft.inputs.shape[1] == P and (ft.targets[:, : P - 1] == -1).all()


def test_in_context_cascade_needs_an_order():
    assert SIC.right_to_left([900, 600, 300]) and SIC.right_to_left([900, None, 300, 300])
    assert not SIC.right_to_left([250, 250, 250])  # all positions at one evaluation: no cascade
    assert not SIC.right_to_left([300, 600]) and not SIC.right_to_left([300, None, None])


def test_in_context_validate_rejects_bad_input():
    ok = SIC.Config(**SIC.QUICK)
    assert SIC.validate(ok) is None
    assert "mode" in SIC.validate(SIC.Config(**{**SIC.QUICK, "mode": "next-token,sideways"}))
    assert "num-nodes" in SIC.validate(SIC.Config(**{**SIC.QUICK, "degree": 20, "num_nodes": 50}))


# ------------------------------------------------------------------ tree-star counts and splits
@pytest.mark.parametrize("d,k,l", [(3, 2, 4), (4, 3, 3), (5, 2, 5)])
def test_tree_star_counts(d, k, l):
    g = C.tree_star(d, k, l, seed=0, split="leaf")
    counts = TS.tree_counts(d, k, l)
    assert g.num_nodes == counts["nodes"] == 1 + d * (k ** (l - 1) - 1) // (k - 1)
    assert len(g.edges) == counts["edges"] == g.num_nodes - 1
    assert g.paths.shape == (counts["leaves"], l) == (d * k ** (l - 2), l)
    assert (g.paths[:, 0] == g.root).all() and len(np.unique(g.leaves)) == counts["leaves"]
    assert (g.degrees()[g.leaves] == 1).all() and g.degrees()[g.root] == d
    assert len(g.train_paths) + len(g.test_paths) == counts["leaves"]


def test_tree_star_first_token_split_shares_no_subtree():
    g = C.tree_star(8, 2, 5, seed=3, train_ratio=0.75, split="first-token")
    assert TS.shared_subtrees(g) == 0
    train_nodes = set(g.train_paths[:, 1:].ravel().tolist())
    test_nodes = set(g.test_paths[:, 1:].ravel().tolist())
    assert not train_nodes & test_nodes  # no node but the root is on both sides
    assert len(np.unique(g.train_paths[:, 1])) == 6 and len(np.unique(g.test_paths[:, 1])) == 2
    leaf = C.tree_star(8, 2, 5, seed=3, train_ratio=0.75, split="leaf")
    assert TS.shared_subtrees(leaf) > 0  # the leaf split does overlap (a held-out path shares a prefix)


# ------------------------------------------------------------------ freeze_embeddings pieces
def test_frozen_embeddings_do_not_move():
    cfg = FE.Config(**{**FE.QUICK, "device": "cpu"})
    g = C.path_star(cfg.degree, cfg.path_length, 0)
    edges, train_set, _ = C.in_weights_path_sets(g, cfg.pauses, "first", "both", "cpu")
    model = FE.build_path_model(cfg, g, True, "cpu")
    before = model.wte.weight.detach().clone()
    C.train(model, [edges, train_set], C.TrainConfig(steps=3, batch_size=16, lr=1e-2, eval_every=10), "cpu", 0,
            log=lambda s: None)
    assert torch.equal(model.wte.weight, before) and torch.equal(model.lm_head.weight, before)


# ------------------------------------------------------------------ end to end: --quick and bad input
CLAIM_SCRIPTS = ["star_in_weights.py", "star_in_context.py", "tiny_graphs.py", "node2vec_spectral.py",
                 "freeze_embeddings.py", "tree_star.py"]


@pytest.mark.parametrize("script", CLAIM_SCRIPTS)
def test_quick_end_to_end(script, tmp_path):
    """The course-assignment use: the script and common.py copied into an empty folder, run there."""
    course = tmp_path / "course"
    course.mkdir()
    for name in (script, "common.py"):
        shutil.copy(os.path.join(HERE, name), course / name)
    out = course / "out"
    r = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--out", "out"], cwd=course,
                       capture_output=True, text=True, timeout=600, env=dict(ONE_THREAD, PYTHONPATH=""))
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(os.listdir(course)) - {"__pycache__"} == {"out", script, "common.py"}  # nothing written beside out/
    res = json.loads((out / "results.json").read_text())
    assert SPEC_KEYS <= set(res) and {"reproduced", "criterion", "value", "threshold"} <= set(res["verdict"])
    assert res["history"] and all({"step", "seconds"} <= set(h) for h in res["history"])
    assert any(f.endswith(".png") for f in os.listdir(out))
    assert all(c.isalnum() or c in "._-" for f in os.listdir(out) for c in f)


@pytest.mark.parametrize("module,args", [(SIC, ["--degree", "1"]), (SIC, ["--mode", "sideways"]),
                                         (SIC, ["--num-nodes", "50", "--degree", "20"]),
                                         (FE, ["--train-ratio", "1.5"]), (FE, ["--frozen-embed-std", "0"]),
                                         (TS, ["--branching", "1"]), (TS, ["--width", "30", "--heads", "4"])])
def test_bad_input_exits_2(module, args, tmp_path, monkeypatch, capsys):
    script = os.path.basename(module.__file__)
    monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(tmp_path / "never")])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"{script}: error:")
    assert not (tmp_path / "never").exists()


def test_bad_input_subprocess_one_line(tmp_path):
    r = run_cmd(["tree_star.py", "--degree", "1", "--out", str(tmp_path / "never")], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == "tree_star.py: error: --degree must be >= 2 (got 1)"


# ===================================================================================== verdicts (learned vs unlearned)
def test_chance_band_is_two_sided_and_binomial():
    lo, hi = C.chance_band(2000, 0.5)
    assert 0.45 < lo < 0.47 and 0.53 < hi < 0.55  # about 0.5 +- 3.3 sigma
    assert C.chance_band(1250, 1 / 5000) == (0.0, pytest.approx(3 / 1250))  # at d = 5000 a handful of hits
    assert C.binomial_tail(0, 100, 0.01) == 1.0
    assert abs(C.binomial_tail(1, 100, 0.01) - (1 - 0.99 ** 100)) < 1e-9
    assert C.binomial_tail(20, 100, 0.01) < 1e-12
    assert abs(C.binomial_tail(0, 100, 0.01, upper=False) - 0.99 ** 100) < 1e-9
    for n, p in ((64, 1 / 32), (25, 0.01), (300, 0.5)):  # the band is the definition, counted per k
        ks = [k for k in range(n + 1) if C.binomial_tail(k, n, p, upper=False) > C.CHANCE_ALPHA / 2
              and C.binomial_tail(k, n, p, upper=True) > C.CHANCE_ALPHA / 2]
        assert C.chance_band(n, p) == (min(ks) / n, max(ks) / n)
    import time
    t0 = time.time()
    assert C.chance_band(20_000, 0.5)[0] > 0.48  # the in-context default's 20k held-out graphs: linear, not n^2
    assert time.time() - t0 < 2


def test_failure_verdict_needs_learning_chance_and_a_control():
    learned = {"edges": 1.0, "train paths": 0.995}
    ok = C.failure_verdict(0.0, 250, 0.01, learned, "x", control=0.9)
    assert ok["reproduced"] and ok["preconditions_met"]
    assert not C.failure_verdict(0.0, 250, 0.01, {"edges": 0.13, "train paths": 1.0}, "x", control=0.9)["reproduced"]
    assert not C.failure_verdict(0.9, 250, 0.01, learned, "x", control=0.9)["reproduced"]  # above chance
    below = C.failure_verdict(0.035, 200, 0.5, learned, "x")  # far *below* chance is not "at chance"
    assert not below["reproduced"] and "outside" in below["why_not"]
    assert not C.failure_verdict(0.0, 250, 0.01, learned, "x", control=0.0)["reproduced"]  # nobody generalized
    assert C.chance_band(10, 0.5) == (0.0, 1.0)  # 10 coin flips: every count is "chance", a perfect model too
    few = C.failure_verdict(1.0, 10, 0.5, learned, "x")
    assert few["at_chance"] and not few["reproduced"] and "too few" in few["why_not"]
    assert C.failure_verdict(0.5, 60, 0.5, learned, "x")["reproduced"]  # 60 flips: the band excludes 1


def _path_final(test_first, test_exact, edge, train_first, train_exact, control=None):
    final = {"test_first_token": test_first, "test_exact": test_exact, "edge_topk": edge, "train_first_token": train_first,
             "train_exact": train_exact, "peak_test_first_token": test_first, "peak_test_exact": test_exact}
    if control is not None:
        final["control"] = {"test_first_token": control}
    return final


@pytest.mark.parametrize("argv,learned,unlearned", [
    (["--hardest-token"], _path_final(0.97, 0, 1, 1, 0), _path_final(0.0, 0, 1, 1, 0)),
    ([], _path_final(0.97, 0.95, 1, 1, 1), _path_final(0.97, 0.3, 1, 1, 1)),
    (["--recipe", "staged"], _path_final(0.97, 0.95, 1, 1, 1), _path_final(0.99, 0.5, 1, 1, 1)),
    (["--hardest-token", "--edges", "forward"], _path_final(0.0, 0, 1, 1, 0, control=0.9),
     _path_final(0.0, 0, 0.14, 0.1, 0, control=0.9)),
    (["--freeze-embeddings"], _path_final(0.0, 0, 1, 1, 1, control=0.9), _path_final(0.0, 0, 0.13, 0.0, 0.0, control=0.9)),
])
def test_star_in_weights_verdict_learned_vs_unlearned(argv, learned, unlearned):
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--degree", "1000"] + argv)
    assert S.compute_verdict(cfg, learned, 250)["reproduced"] is True
    assert S.compute_verdict(cfg, unlearned, 250)["reproduced"] is False


def test_stop_at_end_point_is_named_in_the_verdict(tmp_path, monkeypatch):
    """--stop-at ends the run on the held-out set's accuracy: the verdict says that its value was chosen so."""
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--hardest-token", "--stop-at", "0.9"])
    stopped = {**_path_final(0.92, 0, 1, 1, 0), "stopped_early_at_step": 400}
    assert "--stop-at 0.9, step 400" in S.compute_verdict(cfg, stopped, 250)["criterion"]
    assert "stop" not in S.compute_verdict(cfg, {**stopped, "stopped_early_at_step": None}, 250)["criterion"]
    real_train = C.train  # end to end, the stop made to come at step 200 (a --quick run learns no held-out path)
    monkeypatch.setattr(C, "train", lambda model, sets, tc, *a, **k: real_train(
        model, sets, dataclasses.replace(tc, stop_when=lambda r: r["step"] >= 200), *a, **k))
    res = S.run(C.cli(S.Config, "", S.QUICK, S.validate, argv=["--quick", "--hardest-token", "--stop-at", "0.5",
                                                                "--device", "cpu", "--out", str(tmp_path)]))
    assert res["metrics"]["stopped_early_at_step"] == res["history"][-1]["step"] == 200
    assert "--stop-at 0.5, step 200]" in res["verdict"]["criterion"]


@pytest.mark.parametrize("argv,key", [(["--pauses", "0"], "test_exact"), (["--pauses", "2", "--hardest-token"], "test_first_token"),
                                      (["--pauses", "8"], "test_exact"), (["--pauses", "0", "--reverse-path"], "test_exact")])
def test_pause_ablation_verdict_needs_the_run_with_more_pauses_higher(argv, key):
    """Fig 35: judged against the k = l control; more pauses must give the higher held-out curve (by one
    held-out path out of 25), whichever arm has them; equal curves (nothing learned) do not count."""
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=argv)
    assert S.compares_pauses(cfg) and S.control_of(cfg).pauses == -1 and S.claim_of(cfg)[0].startswith("Fig 35")
    arm_has_more = S.pause_count(cfg) > cfg.path_length
    final = lambda arm, control: {f"mean_{key}": arm, "control": {f"mean_{key}": control}}  # noqa: E731
    more, fewer = 0.6, 0.3
    learned = final(more, fewer) if arm_has_more else final(fewer, more)
    reversed_ = final(fewer, more) if arm_has_more else final(more, fewer)
    assert S.compute_verdict(cfg, learned, 25)["reproduced"] is True
    for unlearned in (reversed_, final(0.0, 0.0), final(0.5, 0.5 + 0.03)):  # the other way, nothing, < one path
        v = S.compute_verdict(cfg, unlearned, 25)
        assert v["reproduced"] is False and "did not give a higher" in v["why_not"]


def test_pause_ablation_only_where_the_claim_is_fig_35():
    import star_in_weights as S
    parse = lambda *a: C.cli(S.Config, "", S.QUICK, S.validate, argv=list(a))  # noqa: E731
    for argv in ([], ["--pauses", "5"], ["--pauses", "-1"], ["--pauses", "0", "--recipe", "staged"],
                 ["--pauses", "0", "--edges", "forward"], ["--pauses", "0", "--freeze-embeddings"]):
        assert not S.compares_pauses(parse(*argv)), argv
    assert S.control_of(parse()) is None and S.control_of(parse("--pauses", "0", "--edges", "forward")).edges == "both"
    assert "Fig 35" in S.validate(dataclasses.replace(parse("--pauses", "0"), stop_at=0.9))


def test_pause_ablation_trains_its_control(tmp_path):
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--quick", "--pauses", "0", "--steps", "60", "--warmup", "10",
                                                        "--eval-every", "30", "--out", str(tmp_path)])
    res = S.run(cfg)
    assert res["data"]["pauses"] == 0 and len(res["control_history"]) == len(res["history"]) == 3
    assert res["metrics"]["control"]["mean_test_exact"] == pytest.approx(
        np.mean([h["test_exact"] for h in res["control_history"][1:]]))
    assert set(res["verdict"]) >= {"mean_test_exact_0_pauses", "mean_test_exact_5_pauses"}
    assert (tmp_path / "accuracy.png").exists() and "control" in res["speed"]


def _stub_answers(paths: np.ndarray, chosen: np.ndarray, vocab: int) -> torch.nn.Module:
    class Stub(torch.nn.Module):  # logits: one-hot on the chosen answers of the prompt's path (found by its leaf)
        def forward(self, idx, pos):
            rows = [int(np.flatnonzero(paths[:, -1] == int(leaf))[0]) for leaf in idx[:, 1]]
            return torch.nn.functional.one_hot(torch.as_tensor(chosen[rows]), vocab).float()
    return Stub()


def test_untied_head_shares_the_embedding_group():
    """--no-tied changes only the tying: the separate head gets the embedding's LR multiplier and decay."""
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--quick", "--no-tied", "--device", "cpu"])
    _, sets, model = S.build(cfg, "cpu")
    assert model.lm_head.weight is not model.wte.weight
    tc = S.train_config(dataclasses.replace(cfg, embed_lr_mult=7.0), 10, 1e-3)
    groups = {gr["name"]: gr for gr in C.make_optimizer(model, tc, "cpu").param_groups}
    emb_ids = {id(p) for p in groups["embedding"]["params"]}
    assert emb_ids == {id(model.wte.weight), id(model.lm_head.weight)} and groups["embedding"]["lr_mult"] == 7.0
    assert "--no-tied" in S.small_command(cfg)


def test_path_error_kinds_sorts_wrong_tokens_by_where_they_land():
    """The held-out error breakdown on a stub whose teacher-forced answers are chosen: an echo of the node
    fed, a step skipped and one taken back on the path, another arm's a1 at the root, a node elsewhere,
    a special token; and in a tree the sibling leaf."""
    g = C.path_star(8, 5, seed=0)
    _, _, test = C.in_weights_path_sets(g, pauses=2, target="full")
    paths, other = g.test_paths, g.train_paths[0]
    assert len(paths) == 2
    chosen = paths.copy()  # (2, 5) root a1 a2 a3 leaf
    chosen[1] = [paths[1, 0], other[1], paths[1, 1], paths[1, 4], paths[1, 1]]  # wrong a1; a1 echoed; leaf early; back
    chosen[0, 3] = other[2]
    kinds = C.path_error_kinds(_stub_answers(paths, chosen, C.vocab_size(g.num_nodes)), g, test, paths)
    assert kinds == {"wrong": [0, 1, 1, 2, 1], "echo": [0, 0, 1, 0, 0], "own_path": [0, 0, 0, 1, 1],
                     "wrong_branch": [0, 1, 0, 0, 0], "elsewhere": [0, 0, 0, 1, 0], "not_a_node": [0] * 5}
    chosen[0, 0] = C.special("[PAUSE]", g.num_nodes)  # the token fed there: not a node, not an echo
    kinds = C.path_error_kinds(_stub_answers(paths, chosen, C.vocab_size(g.num_nodes)), g, test, paths)
    assert kinds["not_a_node"] == [1, 0, 0, 0, 0] and kinds["echo"] == [0, 0, 1, 0, 0]
    t = C.tree_star(2, 2, 4, seed=0)  # root, a1, a2, leaf: a2 has two leaves
    _, _, test = C.in_weights_path_sets(t, pauses=1, target="full")
    chosen = t.test_paths.copy()
    sibling = [p[-1] for p in t.paths if p[-2] == chosen[0, -2] and p[-1] != chosen[0, -1]][0]
    chosen[0, -1] = sibling
    kinds = C.path_error_kinds(_stub_answers(t.test_paths, chosen, C.vocab_size(t.num_nodes)), t, test, t.test_paths)
    assert kinds["wrong_branch"] == [0, 0, 0, 1] and sum(kinds["wrong"]) == 1


def test_freeze_embeddings_verdict_learned_vs_unlearned():
    cfg = C.cli(FE.Config, "", FE.QUICK, FE.validate, argv=["--degree", "1000"])
    assoc = {"edge_topk": 1.0}
    arm = lambda acc, edge, leaves: {"test_first_token": acc, "test_leaves": 250, "edge_topk": edge,  # noqa: E731
                                     "train_first_token": leaves}
    assert FE.compute_verdict(assoc, arm(0.0, 1.0, 1.0), arm(0.5, 1, 1), cfg)["reproduced"]
    assert not FE.compute_verdict(assoc, arm(0.0, 0.14, 0.0), arm(0.5, 1, 1), cfg)["reproduced"]  # frozen stored nothing
    assert not FE.compute_verdict(assoc, arm(0.0, 1.0, 1.0), arm(0.0, 1, 1), cfg)["reproduced"]  # control failed too
    assert not FE.compute_verdict({"edge_topk": 0.8}, arm(0.0, 1.0, 1.0), arm(0.5, 1, 1), cfg)["reproduced"]


def test_star_in_context_verdict_learned_vs_unlearned():
    cfg = C.cli(SIC.Config, "", SIC.QUICK, SIC.validate, argv=[])
    nt = lambda acc, valid, fit: {"first_hop": acc, "first_hop_valid": valid, "train_tf_other": fit,  # noqa: E731
                                  "test_examples": 2000, "exact": 0.0}
    rev = {"exact": 1.0}
    assert SIC.compute_verdict({"next-token": nt(0.49, 1.0, 1.0), "reverse": rev}, cfg)["reproduced"]
    assert not SIC.compute_verdict({"next-token": nt(0.035, 0.1, 0.05), "reverse": rev}, cfg)["reproduced"]  # --steps 5
    assert not SIC.compute_verdict({"next-token": nt(0.99, 1.0, 1.0), "reverse": rev}, cfg)["reproduced"]  # it planned
    assert not SIC.compute_verdict({"next-token": nt(0.49, 1.0, 1.0), "reverse": {"exact": 0.2}}, cfg)["reproduced"]
    first = {"first-token": {**nt(0.5, 1.0, None), "train_tf_other": None}}
    assert SIC.compute_verdict(first, cfg)["reproduced"]
    assert not SIC.compute_verdict({"first-token": {**nt(0.035, 0.1, None)}}, cfg)["reproduced"]


def test_tree_star_verdict_learned_vs_unlearned():
    cfg = C.cli(TS.Config, "", TS.QUICK, TS.validate, argv=[])
    split = lambda exact, hop=1.0: {"test_exact": exact, "test_first_token": hop, "chance_exact": 1 / 8000}  # noqa: E731
    assert TS.compute_verdict({"leaf": split(0.6), "first-token": split(0.2)}, cfg)["reproduced"]
    assert not TS.compute_verdict({"leaf": split(0.0), "first-token": split(0.0)}, cfg)["reproduced"]
    assert not TS.compute_verdict({"leaf": split(0.2), "first-token": split(0.6)}, cfg)["reproduced"]  # not harder
    assert "not harder" in TS.compute_verdict({"leaf": split(0.2), "first-token": split(0.6)}, cfg)["why_not"]
    why = TS.compute_verdict({"leaf": split(0.0), "first-token": split(0.3)}, cfg)["why_not"]
    assert "split at leaf below" in why and "split at first-token" not in why
    # T(256,2,5) on the CPU (README row 9): both above their bars, the first hop harder, the exact match not
    v = TS.compute_verdict({"leaf": split(0.273, 1.0), "first-token": split(0.406, 0.557)}, cfg)
    assert not v["reproduced"] and v["why_not"].startswith("first-token split not harder")
    assert "below" not in v["why_not"] and "first hop 0.557 against 1" in v["why_not"]
    assert (v["leaf_first_hop"], v["first_token_first_hop"]) == (1.0, 0.557)


# ===================================================================================== bad input, every script
SCRIPTS = ["star_in_weights", "star_in_context", "tiny_graphs", "node2vec_spectral", "freeze_embeddings", "tree_star"]
ZERO_OK = {"seed", "pauses", "warmup", "weight_decay", "grad_clip", "edge_steps", "stop_at"}  # 0 is a meaningful setting of these


def _numeric_fields(module):
    return [f for f in dataclasses.fields(module.Config) if f.type in (int, float, "int", "float")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_rejects_bad_values(script, capsys):
    """Sweep every numeric flag of every script with nan/inf (floats) and -3/0 (all): each is refused
    with a one-line error and exit 2 before any work, except a 0 where it is meaningful (ZERO_OK)."""
    import importlib
    module = importlib.import_module(script)
    accepted = []
    for f in _numeric_fields(module):
        flag = "--" + f.name.replace("_", "-")
        values = ["-3", "0"] + (["nan", "inf", "-inf", "-1e-9"] if f.type in (float, "float") else [])
        for value in values:
            argv = [flag, value] + (["--steps", "1000"] if f.name == "warmup" else [])
            try:
                C.cli(module.Config, "", module.QUICK, module.validate, argv=argv)
                accepted.append((f.name, float(value)))
            except SystemExit as exc:
                assert exc.code == 2
                err = capsys.readouterr().err
                assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    allowed = {(name, 0.0) for name in ZERO_OK}
    assert set(accepted) <= allowed, sorted(set(accepted) - allowed)


@pytest.mark.parametrize("script,args", [
    ("star_in_weights.py", ["--seed", "-1"]), ("star_in_weights.py", ["--lr", "nan"]),
    ("star_in_weights.py", ["--lr", "inf"]), ("star_in_weights.py", ["--geometry-paths", "-3"]),
    ("star_in_weights.py", ["--geometry-paths", "0"]), ("star_in_weights.py", ["--warmup", "2000", "--steps", "1000"]),
    ("star_in_weights.py", ["--path-length", "2"]), ("star_in_weights.py", ["--merge-sets", "--model", "mamba"]),
    ("tree_star.py", ["--seed", "-1"]),
    ("star_in_context.py", ["--lr", "nan"]), ("freeze_embeddings.py", ["--warmup", "20000"]),
])
def test_bad_input_listed_in_the_review(script, args, tmp_path, capsys):
    assert_bad_input(script, args, tmp_path, capsys)


@pytest.mark.parametrize("script", [s + ".py" for s in SCRIPTS])
def test_out_naming_a_file_is_refused(script, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    proc, _ = run_script(script, "--quick", out=path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("script", [s + ".py" for s in SCRIPTS])
@pytest.mark.parametrize("args", [["--out", "FILE/sub/run"], ["--seed", str(2**32)], ["--seed", str(C.MAX_SEED + 1)]])
def test_out_below_a_file_and_seeds_numpy_refuses(script, args, tmp_path, capsys):
    """os.makedirs and np.random.seed would raise after the checks: both are refused up front."""
    (tmp_path / "FILE").write_text("keep me")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    import importlib
    mod = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exc:
        C.cli(mod.Config, "", mod.QUICK, mod.validate, argv=["--quick", *args], small=mod.SMALL)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and ": error: " in err, err
    assert (tmp_path / "FILE").read_text() == "keep me"


# ===================================================================================== geometry (Fig 4)
def test_geometry_leaves_same_node_pairs_out():
    import star_in_weights as S
    g = C.path_star(40, 5, seed=0)
    torch.manual_seed(0)
    model = C.build_model("gpt", C.vocab_size(g.num_nodes), 1, 64, 4, "cpu")
    geo = S.geometry(model, g, 10, 0)  # untrained: random embeddings show no diagonal
    assert abs(geo["path_diag"] - geo["path_offdiag"]) < 0.05
    assert abs(geo["leaf_first_hop_diag"] - geo["leaf_first_hop_offdiag"]) < 0.1
    with torch.no_grad():  # plant the arm geometry: every node of an arm near one direction
        arm_dir = torch.randn(len(g.paths), 64)
        for p, direction in zip(g.paths, arm_dir):
            model.wte.weight[torch.from_numpy(p[1:])] = direction + 0.1 * torch.randn(len(p) - 1, 64)
    geo = S.geometry(model, g, 10, 0)
    assert geo["path_diag"] < 0.1 < 0.5 < geo["path_offdiag"] and geo["leaf_first_hop_diag"] < 0.1


# ===================================================================================== paper scale on the CPU
# Every script's default configuration at its full data size (graph, vocabulary, evaluation, figures)
# with the model narrowed to 1 x 16, two training steps and a full evaluation, in a child process
# whose peak resident memory is measured: `pytest test_all.py -m paper_scale` (~10 min; .ci/run runs it). The
# paper's widths and the headline's evaluation cost, below them, take seconds and run in the plain command.
NARROW = ["--layers", "1", "--width", "16", "--heads", "2", "--steps", "2", "--eval-every", "2", "--warmup", "0",
          "--device", "cpu"]
GB = 2 ** 30


@functools.lru_cache(maxsize=1)
def baseline_rss() -> int:
    """Peak resident bytes of a child process that only imports the kit (torch, numpy, matplotlib,
    common), runs one backward pass and saves one figure: measured, not assumed, because it depends on
    the torch build (CPU build 2.13: 0.32 GB; CUDA builds on a CPU: 2.2 0.43 GB, 2.11 0.63 GB)."""
    code = ("import resource, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt, torch, common\n"
            "torch.nn.Linear(16, 16)(torch.randn(4, 16)).sum().backward(); plt.figure().savefig(%r)\n"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", code % os.path.join(tmp, "f.png")], capture_output=True,
                              text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) * 1024


def peak_memory_bound(vocab: int, batch: int, logit_rows_per_example: float) -> float:
    """The bound (bytes) a narrow dry run must stay under, derived from what it holds at once:
    the interpreter with torch and matplotlib (baseline_rss) and 0.35 GB for the graph, data and
    Python objects; the training step's logits at the loss positions (batch x rows x V fp32, held
    ~3 times: logits, softmax, gradient); one evaluation chunk (common.EVAL_BUDGET fp32 logits, ~4 live
    copies: logits, comparisons, top-k). Nothing in it grows with d^2: a (d, d) tensor at d = 5000
    alone would be 100 MB-100 GB and break it."""
    return baseline_rss() + 0.35 * GB + 3 * 4 * batch * logit_rows_per_example * vocab + 4 * 4 * C.EVAL_BUDGET


def dry_run(script, args, tmp_path):
    code = ("import resource, runpy, sys\n"
            f"sys.argv = [{script!r}] + {list(args)!r}\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "finally:\n"
            "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    threads = str(min(4, os.cpu_count() or 1))  # the dry runs run one at a time: give them the machine
    proc = subprocess.run([sys.executable, "-c", code, "--out"], capture_output=True, text=True, timeout=900,
                          cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS=threads))
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0]) * 1024
    return json.load(open(tmp_path / "results.json")), peak


PAPER_SCALE = [  # (script, extra flags, vocabulary, logit rows per training example (max over sets))
    ("star_in_weights.py", ["--hardest-token"], 20_008, 1),  # the headline, G(5000,5)
    ("star_in_weights.py", [], 20_008, 5),  # full path, G(5000,5)
    ("star_in_weights.py", ["--degree", "10000", "--path-length", "10", "--pauses", "10"], 90_008, 10),  # G(10^4,10)
    ("star_in_weights.py", ["--degree", "10000", "--path-length", "10", "--pauses", "10", "--merge-sets"], 90_008,
     10),  # the merged forward at the largest vocabulary: all of a step's logits at once
    ("star_in_weights.py", ["--hardest-token", "--model", "mamba"], 20_008, 1),
    ("star_in_weights.py", ["--hardest-token", "--model", "mamba", "--mamba-block", "release"], 20_008, 1),
    ("star_in_weights.py", ["--hardest-token", "--edges", "forward"], 20_008, 1),  # a failure claim: arm + control
    ("star_in_weights.py", ["--pauses", "0"], 20_008, 5),  # Fig 35: the full path without pauses + its k = l control
    ("star_in_weights.py", ["--hardest-token", "--recipe", "staged", "--edge-steps", "2"], 20_008, 1),  # Fig 36: edges,
    # then paths with a fresh optimizer (its peak / at_end verdict, the stage line); NARROW's 2 steps for each stage
    ("star_in_weights.py", ["--reverse-path"], 20_008, 5),  # Fig 34 left: leaf -> root, G(5000,5)
    ("star_in_weights.py", ["--degree", "10000", "--path-length", "6"], 50_008, 6),  # G(10^4,6), Fig 12 left
    ("freeze_embeddings.py", [], 20_008, 1),
    ("tree_star.py", [], 15_009, 5),  # T(1000,2,5), both splits
    ("star_in_context.py", [], 108, 5),  # 200k training graphs, 20k held out
]


@pytest.mark.paper_scale
@pytest.mark.parametrize("script,args,vocab,rows", PAPER_SCALE, ids=[f"{s}{''.join(a)}" for s, a, _, _ in PAPER_SCALE])
def test_default_configuration_at_paper_scale(script, args, vocab, rows, tmp_path):
    res, peak = dry_run(script, [*args, *NARROW, "--out", str(tmp_path)], tmp_path)
    batch = res["config"]["batch_size"]
    bound = peak_memory_bound(vocab, batch, rows)
    print(f"{script} {' '.join(args)}: peak RSS {peak / GB:.2f} GB (bound {bound / GB:.2f} GB), {res['seconds']:.0f} s")
    assert peak < bound, f"peak memory {peak / GB:.2f} GB over the derived bound {bound / GB:.2f} GB"
    assert isinstance(res["verdict"]["reproduced"], bool)
    assert res["history"][-1]["step"] >= 2 and any(f.endswith(".png") for f in os.listdir(tmp_path))
    if script == "star_in_weights.py":
        assert res["data"]["nodes"] == {20_008: 20_001, 50_008: 50_001, 90_008: 90_001}[vocab]
        assert 0 <= res["metrics"]["edge_topk"] <= 1 and res["metrics"]["geometry_path_diag"] > 0


def test_gpu_check_stages_fit_their_call(tmp_path, monkeypatch):
    """Every whole-budget run has an estimate, and each stage's runs fit the seconds a call leaves them (an
    overloaded stage would stop its runs at the cap, their verdicts lost); the 'full' phase runs two at a time."""
    import gpu_check
    lanes = []
    monkeypatch.setattr(gpu_check, "run_group", lambda runs, env, cap, work, parallel, run_cap=None:
                        lanes.append(parallel) or [])
    assert gpu_check.main(["--cpu-rehearsal", "--stage", "4", "--out", str(tmp_path / "o"),
                           "--work", str(tmp_path / "w")]) == 0
    assert lanes == [1, 2]  # env alone, then the three whole-budget runs two at a time
    for stage, specs in gpu_check.FULL.items():
        names = [name for name, *_ in specs]
        assert set(names) <= set(gpu_check.ESTIMATE), stage
        assert sum(map(gpu_check.estimate_seconds, names)) <= gpu_check.STAGE_SECONDS, (stage, names)
    assert sorted(gpu_check.ESTIMATE) == sorted(name for specs in gpu_check.FULL.values() for name, *_ in specs)
    assert gpu_check.STAGE_SECONDS <= 570 - gpu_check.RESERVE - 60 and set(gpu_check.LANES) == {"full"}


@pytest.mark.paper_scale
def test_gpu_check_estimates_match_the_runs(monkeypatch, tmp_path):
    """The TFLOP a step and the steps that size the GPU stages are each run's own: its first train() call, on its
    real data and model (built here on the CPU, nothing trained), as common.model_flops_per_step counts it."""
    import importlib
    import gpu_check

    class Stop(Exception):
        pass

    def first_call(model, sets, tc, *a, **k):
        seen.append((tc.steps, C.model_flops_per_step(model, sets, tc.batch_size) / 1e12))
        raise Stop
    monkeypatch.setattr(C, "train", first_call)
    monkeypatch.setattr(C, "cpu_time_check", lambda *a, **k: None)  # it would time two steps at paper width
    for name, argv in (r for stage in gpu_check.FULL for _, group, _ in gpu_check.plan(str(tmp_path), False, stage)
                       for r in group if r[0] != "env"):
        script = importlib.import_module(os.path.basename(argv[1])[:-3])
        cfg = C.cli(script.Config, "", script.QUICK, script.validate, argv=["cpu" if a == "cuda" else a for a in argv[2:]])
        seen = []
        with pytest.raises(Stop):
            script.run(cfg)
        steps, tflop = gpu_check.ESTIMATE[name][0][0]
        assert seen[0][0] == steps and seen[0][1] == pytest.approx(tflop, rel=0.01, abs=5e-4), (name, seen)


# The paper's widths, constructed once (no training): parameter count and one forward pass, so that a
# shape error at the real size shows on the CPU.
@pytest.mark.parametrize("kind,vocab,layers,width,heads,seq", [
    ("gpt", 20_008, 12, 384, 8, 12), ("gpt", 90_008, 12, 784, 8, 22), ("mamba", 20_008, 12, 384, 8, 12),
    ("gpt", 15_009, 12, 384, 8, 12), ("gpt", 108, 12, 384, 8, 40)])
def test_paper_width_models_build_and_run(kind, vocab, layers, width, heads, seq):
    torch.manual_seed(0)
    model = C.build_model(kind, vocab, layers, width, heads, "cpu")
    n = C.count_params(model)
    assert n["total"] - n["non_embedding"] == vocab * width  # tied: one V x m matrix
    x = torch.randint(0, vocab, (2, seq))
    with torch.no_grad():
        assert model(x, torch.tensor([seq - 1])).shape == (2, 1, vocab)


def test_headline_evaluation_costs_under_a_tenth_of_its_training():
    """One full evaluation of the headline (G(5000,5), every edge, every path, geometry) against the
    --eval-every steps it interrupts, in matmul FLOPs of the paper's 12 x 384 model: < 10%."""
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--hardest-token"])
    g = C.path_star(cfg.degree, cfg.path_length, 0)
    edges, train, test = C.in_weights_path_sets(g, S.pause_count(cfg), "first")
    vocab, m, L = C.vocab_size(g.num_nodes), cfg.width, cfg.layers
    body = 12 * m * m * L  # non-embedding parameters of the blocks
    fwd = lambda n, T, n_loss: 2 * body * n * T + 2 * L * n * T * T * m + 2 * m * vocab * n * n_loss  # noqa: E731
    T_path = train.inputs.shape[1]
    evaluation = (fwd(g.num_nodes, 2, 1)  # edge prompts of every node
                  + 2 * fwd(len(train) + len(test), T_path, 1))  # teacher-forced + one greedy token per path
    shares = C.batch_shares([edges, train], cfg.batch_size)
    step = 3 * (fwd(shares[0], 2, 1) + fwd(shares[1], T_path, 1))
    assert evaluation / (cfg.eval_every * step) < 0.10


# ===================================================================================== sweep.py (the sweep runner)
# A fake experiment script, written into tmp_path, stands in for the kit's scripts: it takes --seed,
# --out and a few flags, appends its --out to calls.txt (so a test can count invocations), and writes
# a results.json whose numbers are simple functions of its flags.
SWEEP = os.path.join(HERE, "sweep.py")

FAKE = r'''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, required=True)
p.add_argument("--out", required=True)
p.add_argument("--degree", type=int, default=10)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--model", default="gpt")
p.add_argument("--double", action=argparse.BooleanOptionalAction, default=False)
p.add_argument("--sleep", type=float, default=0.0)
a = p.parse_args()
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.txt"), "a") as fh:
    fh.write(a.out + "\n")
if a.degree < 0:
    sys.exit("boom: negative degree")
start = time.time()
time.sleep(a.sleep)
# held-out accuracy climbs linearly with the step: acc = step * degree * (seed + 1) / 4000
history = [{"step": s, "seconds": s / 10, "epoch": s // 20, "acc": min(1.0, s * a.degree * (a.seed + 1) / 4000)}
           for s in range(0, 101, 10)]
final = a.degree / 100 + a.seed / 10 + (1.0 if a.double else 0.0)
res = {"script": "fake", "claim": "c", "config": vars(a), "device": "cpu", "seconds": 1.0 + a.seed,
       "metrics": {"final": final, "nested": {"lr": a.lr}}, "history": history,
       "verdict": {"reproduced": final >= 0.45, "criterion": "final >= 0.45", "value": final},
       "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")},
       "start": start, "end": time.time()}
os.makedirs(a.out, exist_ok=True)
json.dump(res, open(os.path.join(a.out, "results.json"), "w"))
'''

GRID = ["--grid", "degree=20,40", "--grid", "lr=1e-3,3e-3", "--seeds", "0,1", "--set", "double=false"]
KEYS = [f"degree={d}__lr={lr}__seed={s}" for d in (20, 40) for lr in ("0.001", "0.003") for s in (0, 1)]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU mode, and no torch import to count GPUs
    path = tmp_path / "fake_experiment.py"
    path.write_text(FAKE)
    return path


def calls(fake):
    path = fake.parent / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def run_sweep(*args):
    return subprocess.run([sys.executable, SWEEP, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))


def test_grid_times_seeds_gives_points_and_commands(fake, tmp_path, capsys):
    spec = dict(script=str(fake), grid={"degree": [20, 40], "lr": [0.001, 0.003]}, set={"double": False, "layers": 4},
                seeds=[0, 1], metric="final", reach=[], x="degree")
    points = sweep.make_points(spec, str(tmp_path / "out"))
    assert [p["key"] for p in points] == KEYS
    p = points[5]  # degree=40, lr=0.001, seed=1
    assert p["out"] == str(tmp_path / "out" / "points" / "degree=40__lr=0.001__seed=1")
    assert p["cmd"] == [sys.executable, str(fake), "--no-double", "--layers", "4", "--degree", "40", "--lr", "0.001",
                        "--seed", "1", "--out", p["out"]]
    assert sweep.point_command("s.py", {"hardest-token": True}, 3, "o") == [sys.executable, "s.py", "--hardest-token",
                                                                             "--seed", "3", "--out", "o"]
    # the CLI: underscores become dashes, true/false become --flag/--no-flag; --dry-run runs nothing
    out = tmp_path / "dry"
    assert sweep.main([str(fake), *GRID, "--set", "batch_size=8", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "8 to run" in lines[0] and len(lines) == 9
    assert "--no-double --batch-size 8 --degree 20 --lr 0.001 --seed 0" in lines[1]
    assert not out.exists() and calls(fake) == []


def test_rerun_skips_finished_points_and_redoes_missing_ones(fake, tmp_path, capsys):
    out = tmp_path / "sw"
    args = [str(fake), "--grid", "degree=20,40", "--seeds", "0,1,2", "--out", str(out), "--metric", "final"]
    keys = [f"degree={d}__seed={s}" for d in (20, 40) for s in (0, 1, 2)]
    assert sweep.main(args) == 0
    assert sorted(os.path.basename(c) for c in calls(fake)) == sorted(keys)
    assert sweep.main(args) == 0
    assert len(calls(fake)) == 6  # nothing rerun
    assert "6 finished (skipped), 0 to run" in capsys.readouterr().out
    os.remove(out / "points" / keys[1] / "results.json")
    (out / "points" / keys[4] / "results.json").write_text('{"script": "fa')  # cut off mid-write: not finished
    assert sweep.main(args) == 0
    assert "4 finished (skipped), 2 to run" in capsys.readouterr().out
    assert sorted(os.path.basename(c) for c in calls(fake)[6:]) == [keys[1], keys[4]]
    assert all(sweep.load_results(out / "points" / k) for k in keys)


def test_summary_values_match_hand_computed(fake, tmp_path):
    out = tmp_path / "sw"
    assert sweep.main([str(fake), *GRID, "--out", str(out), "--metric", "final",
                       "--reach", "acc>=0.25", "--reach", "acc >= 2"]) == 0
    rows = {(r["degree"], r["lr"], r["seed"]): r for r in csv.DictReader(open(out / "summary.csv"))}
    assert len(rows) == 8
    r = rows[("20", "0.001", "0")]  # acc = step * 20 / 4000 reaches 0.25 at step 50 (epoch 50 // 20)
    assert (r["status"], float(r["metric"]), r["reproduced"], r["seconds"]) == ("done", 0.2, "false", "1.0")
    assert (r["acc>=0.25 step"], r["acc>=0.25 epoch"], r["acc>=2 step"], r["acc>=2 epoch"]) == ("50", "2", "", "")
    r = rows[("40", "0.003", "1")]  # acc = step * 80 / 4000 >= 0.25 first at step 20 (12.5 is not a step)
    assert (float(r["metric"]), r["reproduced"], r["acc>=0.25 step"], r["acc>=0.25 epoch"]) == (0.5, "true", "20", "1")
    md = (out / "summary.md").read_text()
    # degree 20: finals 0.2, 0.3 -> mean 0.25, std (n-1) 0.0707; reach steps 50, 30 -> median 40
    assert "| 20 | 0.001 | 2 | 0.25 | 0.07071 | 0.2 | 0.3 | 0/2 | 1.5 | 40 (2/2) |  (0/2) |" in md
    # degree 40: finals 0.4, 0.5 -> one of two >= 0.45; reach steps 30, 20 -> median 25
    assert "| 40 | 0.003 | 2 | 0.45 | 0.07071 | 0.4 | 0.5 | 1/2 | 1.5 | 25 (2/2) |  (0/2) |" in md
    # --aggregate alone redoes the summary from sweep.json, here with a nested metric and verdict.reproduced
    for f in ("summary.csv", "summary.md", "summary.png"):
        os.remove(out / f)
    assert sweep.main(["--aggregate", str(out), "--metric", "nested.lr"]) == 0
    assert {float(r["metric"]) for r in csv.DictReader(open(out / "summary.csv"))} == {0.001, 0.003}
    assert (out / "summary.png").exists() and "acc>=0.25" in (out / "summary.md").read_text()
    assert sweep.main(["--aggregate", str(out), "--metric", "verdict.reproduced"]) == 0
    assert "| 40 | 0.001 | 2 | 0.5 | 0.7071 | 0 | 1 | 1/2 |" in (out / "summary.md").read_text()
    assert len(calls(fake)) == 8


def test_group_takes_the_median_step_of_the_seeds_that_reached():
    spec = dict(grid={"degree": [5]}, reach=["acc>=0.9"])
    rows = [dict(degree=5, seed=s, metric=m, reproduced=m is not None and m > 1, seconds=2.0, **{"acc>=0.9 step": step})
            for s, (m, step) in enumerate([(1.0, 10), (2.0, 90), (6.0, 20), (None, None)])]
    (g,) = sweep.group(spec, rows)
    assert (g["n"], g["runs"], g["mean"], g["min"], g["max"], g["reproduced"]) == (3, 4, 3.0, 1.0, 6.0, 2)
    assert g["std"] == pytest.approx(7 ** 0.5)  # deviations -2, -1, 3: (4 + 1 + 9) / (3 - 1)
    assert (g["acc>=0.9 median"], g["acc>=0.9 steps"]) == (20, [10, 90, 20])


def test_failed_point_exits_1_and_the_others_finish(fake, tmp_path, capsys):
    out = tmp_path / "sw"
    args = [str(fake), "--grid", "degree=20,-5", "--seeds", "0,1", "--out", str(out)]
    assert sweep.main(args) == 1
    err = capsys.readouterr().err
    assert "FAILED degree=-5__seed=0" in err and "boom: negative degree" in err and "2 of 4 points failed" in err
    assert all((out / "points" / f"degree=20__seed={s}" / "results.json").exists() for s in (0, 1))
    assert not (out / "points" / "degree=-5__seed=1" / "results.json").exists()
    assert len(calls(fake)) == 4
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["status"] for r in rows] == ["done", "done", "missing", "missing"]
    md = (out / "summary.md").read_text()  # a failed point is not counted as a run that did not reproduce
    assert "| 20 | 2 | 0.25 | 0.07071 | 0.2 | 0.3 | 0/2 | 1.5 |" in md and "| -5 | 0 |  |  |  |  | 0/0 (2 missing) |" in md, md
    assert sweep.main(args) == 1 and len(calls(fake)) == 6  # only the failed points rerun


@pytest.mark.parametrize("args", [
    ["missing_script.py", "--out", "{out}"],
    ["{fake}", "--grid", "lr", "--out", "{out}"],
    ["{fake}", "--grid", "lr=1e-3,,2e-3", "--out", "{out}"],
    ["{fake}", "--grid", "lr=1,1", "--out", "{out}"],
    ["{fake}", "--seeds", "", "--out", "{out}"],
    ["{fake}", "--seeds", "0,x", "--out", "{out}"],
    ["{fake}", "--jobs", "0", "--out", "{out}"],
    ["{fake}", "--jobs", "two", "--out", "{out}"],
    ["{fake}", "--reach", "acc>0.9", "--out", "{out}"],
    ["{fake}", "--reach", "acc>=high", "--out", "{out}"],
    ["{fake}", "--grid", "degree=1,2", "--x", "lr", "--out", "{out}"],
    ["{fake}", "--set", "seed=3", "--out", "{out}"],
    ["{fake}", "--grid", "degree=1"],
    ["--aggregate", "{out}"],
])
def test_bad_input_exits_2_with_one_line(fake, tmp_path, capsys, args):
    out = tmp_path / "must_not_exist"
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback
        sweep.main([a.format(fake=fake, out=out) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sweep.py: error: "), err
    assert not out.exists() and calls(fake) == []


def test_bad_input_from_the_command_line(fake, tmp_path):
    out = tmp_path / "must_not_exist"
    for args in (["nope.py", "--out", out], [fake, "--grid", "lr=", "--out", out], [fake, "--jobs", "x", "--out", out]):
        proc = run_sweep(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and calls(fake) == []


def test_figure_is_written_for_metric_reach_and_categorical_x(fake, tmp_path):
    out = tmp_path / "sw"
    assert sweep.main([str(fake), "--grid", "model=gpt,mamba", "--grid", "degree=20,40", "--out", str(out),
                       "--metric", "final"]) == 0  # x = model: not a number
    png = out / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    os.remove(png)
    assert sweep.main(["--aggregate", str(out), "--x", "degree", "--reach", "acc>=0.25", "--reach", "acc>=0.5"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert not [f for f in os.listdir(out) if f.startswith(".tmp_")]  # atomic writes leave no temp files
    assert json.loads((out / "sweep.json").read_text())["grid"] == {"model": ["gpt", "mamba"], "degree": [20, 40]}


def test_run_local_threads_and_one_point_per_gpu(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    # the long first point keeps its GPU busy while the three short ones pass through the other
    spec = dict(script=str(fake), grid={"sleep": [0.6, 0.1, 0.15, 0.2]}, set={}, seeds=[0])
    gpu_points = sweep.make_points(spec, str(tmp_path / "gpu"))
    codes = sweep.run_local(gpu_points, jobs=4, devices=["5", "7"])
    assert set(codes.values()) == {0}
    res = [sweep.load_results(p["out"]) for p in gpu_points]
    assert {r["env"]["CUDA_VISIBLE_DEVICES"] for r in res} == {"5", "7"}
    assert {r["env"]["OMP_NUM_THREADS"] for r in res} == {"4"}  # threads left alone on GPU
    for a in res:  # two points on the same GPU never overlap in time
        for b in res:
            if a is not b and a["env"]["CUDA_VISIBLE_DEVICES"] == b["env"]["CUDA_VISIBLE_DEVICES"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"]
    cpu_points = sweep.make_points(dict(spec, grid={"degree": [1, 2]}), str(tmp_path / "cpu"))
    assert set(sweep.run_local(cpu_points, jobs=2, devices=[]).values()) == {0}
    envs = [sweep.load_results(p["out"])["env"] for p in cpu_points]
    assert all(e["OMP_NUM_THREADS"] == "1" and e["MKL_NUM_THREADS"] == "1" for e in envs)


def test_sweep_out_that_is_a_file_or_below_one_exits_2(fake, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):  # was FileExistsError / NotADirectoryError: a traceback, exit 1
        with pytest.raises(SystemExit) as exit_info:
            sweep.main([str(fake), "--grid", "degree=20,40", "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("sweep.py: error: --out ") and "file" in err, err
    assert afile.read_text() == "keep me" and calls(fake) == []


def test_sweep_checks_every_points_flags_with_the_scripts_cli_before_writing(tmp_path, capsys):
    script = os.path.join(HERE, "star_in_weights.py")
    out = tmp_path / "sw"
    for args, named in ((["--set", "bogus=1"], "--bogus"),  # a typo in --set: was found only inside each point
                        (["--grid", "degree=20,1"], "degree=1__seed=0"),  # validate(): degree >= 2
                        (["--grid", "degree=20", "--set", "lr=fast"], "--lr")):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main([script, *args, "--out", str(out)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "star_in_weights.py refuses the flags of point" in err, err
        assert named in err, err
        assert not out.exists()  # no sweep.json, no points/*/log.txt: nothing to get stuck on
    # good flags pass the check (--dry-run: nothing runs, nothing is written)
    assert sweep.main([script, "--grid", "degree=20,40", "--set", "quick=true", "--out", str(out), "--dry-run"]) == 0
    assert "2 to run" in capsys.readouterr().out and not out.exists()


def test_sweep_folder_with_no_finished_point_accepts_corrected_set_flags(fake, tmp_path, capsys):
    # a sweep whose every point failed (e.g. a bad --set, from before the flags were checked) is not stuck
    out = tmp_path / "sw"
    (out / "points" / "degree=20__seed=0").mkdir(parents=True)
    (out / "points" / "degree=20__seed=0" / "log.txt").write_text("error: unrecognized arguments: --bogus 1\n")
    (out / "sweep.json").write_text(json.dumps(dict(script=str(fake), grid={"degree": [20]}, set={"bogus": 1},
                                                    seeds=[0], metric="verdict.value", reach=[], x="degree")))
    assert sweep.main([str(fake), "--grid", "degree=20", "--set", "double=true", "--out", str(out)]) == 0
    assert json.loads((out / "sweep.json").read_text())["set"] == {"double": True}
    # but a folder with a finished point of another experiment is still refused
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([str(fake), "--grid", "degree=20", "--set", "double=false", "--out", str(out)])
    assert exit_info.value.code == 2 and "another script or other --set flags" in capsys.readouterr().err


def test_sweep_whole_numbers_in_scientific_notation_reach_int_flags_as_integers(fake, tmp_path, capsys):
    assert sweep.parse_value("1e3") == 1000 and type(sweep.parse_value("1e3")) is int
    assert sweep.parse_value("2.5E3") == 2500 and type(sweep.parse_value("-1e2")) is int
    assert type(sweep.parse_value("1000.0")) is float and sweep.parse_value("1e-3") == 0.001  # as written: floats
    out = tmp_path / "sw"  # the fake's --degree is an int flag: '--degree 20.0' failed every point
    assert sweep.main([str(fake), "--grid", "degree=2e1,4e1", "--out", str(out), "--metric", "final"]) == 0
    assert sorted(os.path.basename(c) for c in calls(fake)) == ["degree=20__seed=0", "degree=40__seed=0"]
    assert json.loads((out / "sweep.json").read_text())["grid"] == {"degree": [20, 40]}
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["degree"], r["status"]) for r in rows] == [("20", "done"), ("40", "done")]
    # and a kit script's int flag: --steps 1000, not --steps 1000.0
    script = os.path.join(HERE, "star_in_weights.py")
    assert sweep.main([script, "--grid", "steps=1e3,2e3", "--set", "quick=true", "--out", str(tmp_path / "k"),
                       "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "--quick --steps 1000 --seed 0" in printed and "--steps 2000 --seed 0" in printed, printed


def test_sweep_reach_is_left_empty_where_a_history_restarts_its_steps(fake, tmp_path, capsys):
    one = [{"step": s, "epoch": s // 20, "acc": s / 100} for s in (0, 50, 100)]
    assert sweep.first_reach(one, "acc", 0.5) == (50, 2)
    two_modes = [{"step": s, "acc": a} for s, a in ((0, 0.0), (50, 0.9), (0, 0.0), (50, 0.1))]  # star_in_context-like
    with pytest.raises(ValueError):
        sweep.first_reach(two_modes, "acc", 0.5)
    out = tmp_path / "sw"
    assert sweep.main([str(fake), "--grid", "degree=20,40", "--out", str(out), "--reach", "acc>=0.25"]) == 0
    capsys.readouterr()
    path = out / "points" / "degree=40__seed=0" / "results.json"
    res = json.loads(path.read_text())
    res["history"] = res["history"] + [dict(h, acc=0.0) for h in res["history"]]  # a second mode, from step 0
    path.write_text(json.dumps(res))
    assert sweep.main(["--aggregate", str(out)]) == 0
    rows = {r["degree"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["20"]["acc>=0.25 step"] == "50" and rows["40"]["acc>=0.25 step"] == ""  # was 30: the first mode's
    assert "left empty for 1 point(s)" in (out / "summary.md").read_text()
    assert "degree=40__seed=0" in (out / "summary.md").read_text()
    assert "--reach left empty for 1 point(s)" in capsys.readouterr().err


def test_recipe_study_bad_out_and_bad_flags_are_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    import recipe_study as RS
    ran = []
    monkeypatch.setattr(RS, "all_sweeps", lambda: ran.append("sweeps") or [])  # the ~1 h sweeps of --run
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for args in (["--run", "--out", str(afile)], ["--out", str(afile / "sub")], ["--levers", "--out", str(afile)]):
        assert RS.main(args) == 2
    assert ran == [] and afile.read_text() == "keep me"  # --run checked --out only after its sweeps
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("recipe_study: --out ") for e in errors), errors
    proc = run_cmd(["recipe_study.py", "--bogus"], tmp_path)  # argparse's usage dump was two lines
    assert proc.returncode == 2 and proc.stderr.strip() == "recipe_study: error: unrecognized arguments: --bogus"
    assert os.listdir(tmp_path) == ["afile"]
    with pytest.raises(SystemExit):
        RS.main(["--help"])
    assert "curated study on purpose" in " ".join(capsys.readouterr().out.split())


def test_recipe_study_writes_are_atomic(tmp_path, monkeypatch):
    import matplotlib.figure
    import recipe_study as RS
    monkeypatch.setattr(RS, "RUNS", str(tmp_path / "runs"))
    for d in (100, 200):  # two finished points of the recipe's sweep
        folder = tmp_path / "runs" / RS.SWEEPS["embed x10, wd 0.1"][0] / "points" / f"degree={d}__seed=0"
        folder.mkdir(parents=True)
        hist = [{"step": s, "epoch": s / 100, "test_first_token": a} for s, a in ((0, 0.0), (250, 0.6), (500, 0.95))]
        json.dump({"config": {"degree": d, "seed": 0, "embed_lr_mult": 10.0, "weight_decay": 0.1}, "history": hist,
                   "metrics": {"peak_test_first_token": 0.95, "edge_topk": 1.0, "train_first_token": 1.0}},
                  open(folder / "results.json", "w"))
    out = tmp_path / "study"
    out.mkdir()
    for name in ("study.csv", "study.md", "steps_to_90.png"):
        (out / name).write_text("the kept study")

    def interrupted(self, fname, *args, **kwargs):  # a write cut off half way
        with open(fname, "w") as fh:
            fh.write("half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    monkeypatch.setattr(csv.DictWriter, "writerows", lambda self, rows: (_ for _ in ()).throw(RuntimeError("interrupted")))
    with pytest.raises(RuntimeError, match="interrupted"):
        RS.main(["--out", str(out)])
    assert all((out / n).read_text() == "the kept study" for n in ("study.csv", "study.md", "steps_to_90.png"))
    monkeypatch.undo()
    monkeypatch.setattr(RS, "RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):  # the figure is written last: the tables are new, the old figure whole
        RS.main(["--out", str(out)])
    assert (out / "steps_to_90.png").read_text() == "the kept study" and "100" in (out / "study.csv").read_text()
    monkeypatch.undo()
    monkeypatch.setattr(RS, "RUNS", str(tmp_path / "runs"))
    assert RS.main(["--out", str(out)]) == 0
    assert (out / "steps_to_90.png").read_bytes()[:4] == b"\x89PNG" and "| 200 |" in (out / "study.md").read_text()
    assert not [f for f in os.listdir(out) if f.startswith(".tmp_")]  # no temp file left behind
    # levers.md and levers.png: the same
    run = tmp_path / "levers" / "gpt12x384_d400" / "x30"
    run.mkdir(parents=True)
    cfg = {"degree": 400, "embed_lr_mult": 30.0, "seed": 0, "lr": 3e-4, "layers": 12, "width": 384, "batch_size": 256,
           "steps": 4000}
    hist = [{"step": s, "test_first_token": a, "edge_top1_valid": 1.0, "train_first_token": 1.0} for s, a in ((0, 0), (250, 1))]
    json.dump({"config": cfg, "history": hist, "seconds": 1.0}, open(run / "results.json", "w"))
    (tmp_path / "levers" / "levers.png").write_text("the kept figure")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        RS.main(["--levers", "--out", str(tmp_path / "levers")])
    assert (tmp_path / "levers" / "levers.png").read_text() == "the kept figure"
    assert not [f for f in os.listdir(tmp_path / "levers") if f.startswith(".tmp_")]


def test_node2vec_spectral_verdict_learned_vs_unlearned():
    import node2vec_spectral as N2V
    cfg = C.cli(N2V.Config, "", N2V.QUICK, N2V.validate, argv=[])
    init = {"energy_top": 0.15, "null_residual": 0.5, "Ce_ratio": 1.0, "energy_bottom": 0.3}
    trained = {"energy_top": 0.98, "null_residual": 1e-4, "Ce_ratio": 0.01, "energy_bottom": 0.0}
    summary = lambda g, last: {"graph": g, "checks": N2V.graph_checks(init, last, cfg),  # noqa: E731
                               "final_energy_top": last["energy_top"], "zigzag_ratio": 0.0}
    assert N2V.compute_verdict([summary("a", trained), summary("b", trained)], cfg)[0]["reproduced"]
    assert not N2V.compute_verdict([summary("a", trained), summary("b", init)], cfg)[0]["reproduced"]
    # the 3-cycle's top band is its whole non-trivial spectrum: energy 1.0 at init, no rest to compare C e_i with
    start = {**init, "energy_top": 1.0, "Ce_ratio": None}
    v = N2V.compute_verdict([{**summary("c3", {**trained, "energy_top": 1.0, "Ce_ratio": None}),
                              "checks": N2V.graph_checks(start, {**trained, "energy_top": 1.0, "Ce_ratio": None}, cfg)}], cfg)[0]
    assert not v["reproduced"] and "c3/energy_top_below_0.9_at_init" in v["why_not"] and "Ce_top" in v["why_not"]


# ===================================================================================== tiny graphs: the margin, seeds (issue 8)
def star_targets():
    g = C.path_star(4, 5, seed=0)
    return g, C.neighbour_targets(C.directed_edges(g), g.num_nodes)


# ---------------------------------------------------------------------------------------------- the margin
def test_geometric_margin_sign_geometric_vs_associative():
    g = C.cycle_graph(15)
    targets = C.neighbour_targets(C.directed_edges(g), 15)
    # geometric: nodes on a circle (the cycle's Fiedler pair), logits = cosines -> the skew keeps them
    theta = 2 * np.pi * np.arange(15) / 15
    E_geo = np.stack([np.cos(theta), np.sin(theta)], 1)
    geo = C.geometric_margin(E_geo, E_geo @ E_geo.T, targets)
    assert geo["margin_original"] > 0.2 and geo["margin_skewed"] > 0.2 and geo["top1_skewed"] == 1.0
    # associative: random embeddings (width = N), a lookup middle matrix that maps E_u onto the sum of
    # its neighbours' dual vectors: the real logits are 3A exactly, their skewed version is not
    rng = np.random.default_rng(0)
    E = rng.normal(size=(15, 15))
    W = (np.linalg.pinv(E) @ (3 * g.adjacency()) @ np.linalg.pinv(E).T).T  # E W^T E^T = 3A
    assoc = C.geometric_margin(E, C.middle_logits(E, W), targets)
    assert abs(assoc["margin_original"] - 3.0) < 1e-6 and assoc["top1_original"] == 1.0
    assert assoc["margin_skewed"] < 0 and assoc["logits_outside_span"] < 1e-9


def test_skew_logits_is_the_papers_skew_for_a_bias_free_middle_matrix():
    rng = np.random.default_rng(0)
    for n, m in ((6, 10), (10, 6)):  # fewer and more nodes than dimensions
        E, W = rng.normal(size=(n, m)), rng.normal(size=(m, m))
        assert np.allclose(C.skew_logits(E, E @ W.T @ E.T), E @ C.skew_middle(E, W).T @ E.T)


def test_skew_middle_keeps_diagonal_in_singular_basis():
    rng = np.random.default_rng(0)
    E, W = rng.normal(size=(6, 10)), rng.normal(size=(10, 10))
    _, _, Vh = np.linalg.svd(E, full_matrices=False)
    Ws = C.skew_middle(E, W)
    assert np.allclose(Vh @ Ws @ Vh.T, np.diag(np.diag(Vh @ W @ Vh.T)))
    assert np.allclose(C.skew_middle(E, W), C.skew_middle(E, W.T))  # the transpose does not matter


def skewed_margin(definition, E, W, b, targets):
    if definition == "logits":  # the kit's definition: the margin of the model's node logits
        return C.geometric_margin(E, C.middle_logits(E, W, b), targets)["margin_skewed"]
    return C.geometric_margin_bias_apart(E, W, targets, b)["margin_skewed"]  # the old one: W skewed, b kept apart


@pytest.mark.parametrize("definition", ["logits", pytest.param("bias_apart", marks=pytest.mark.xfail(
    strict=True, reason="the old definition depends on how the same logits are split into W and b"))])
def test_skewed_margin_invariant_to_folding_the_bias_into_the_matrix(definition):
    """(W, b) and (W + b c^T, 0) with E c = 1 give the same logits (N = 17 <= m = 32), so the skewed
    margin must not tell them apart. Passes for the margin of the logits; fails (xfail, strict) for the
    old definition: -6.02 vs -0.93 here."""
    g, targets = star_targets()
    rng = np.random.default_rng(0)
    E, W, b = rng.normal(size=(g.num_nodes, 32)), rng.normal(size=(32, 32)) / 32, rng.normal(size=32)
    c = np.linalg.lstsq(E, np.ones(g.num_nodes), rcond=None)[0]
    W_folded, no_bias = W + np.outer(b, c), np.zeros(32)
    assert np.allclose(C.middle_logits(E, W, b), C.middle_logits(E, W_folded), atol=1e-10)  # one function
    assert abs(skewed_margin(definition, E, W, b, targets) - skewed_margin(definition, E, W_folded, no_bias, targets)) < 1e-6


def test_both_definitions_agree_without_a_bias():
    g, targets = star_targets()
    rng = np.random.default_rng(0)
    E, W = rng.normal(size=(g.num_nodes, 32)), rng.normal(size=(32, 32))
    assert abs(skewed_margin("logits", E, W, None, targets) - skewed_margin("bias_apart", E, W, None, targets)) < 1e-9


def test_margin_invariant_to_rotating_or_scaling_the_embedding_space():
    g, targets = star_targets()
    rng = np.random.default_rng(1)
    E, L = rng.normal(size=(g.num_nodes, 32)), rng.normal(size=(g.num_nodes, g.num_nodes))
    Q = np.linalg.qr(rng.normal(size=(32, 32)))[0]
    ref = C.geometric_margin(E, L, targets)["margin_skewed"]
    assert abs(C.geometric_margin(3.0 * E @ Q, L, targets)["margin_skewed"] - ref) < 1e-9


def test_edge_prompt_logits_of_a_one_matrix_model_include_its_bias():
    g, _ = star_targets()
    N = g.num_nodes
    torch.manual_seed(0)
    model = TG.build("nn", C.vocab_size(N), 32, "cpu", tied=True).eval()
    lin = model.blocks[0].mlp[0]
    with torch.no_grad():
        lin.bias.normal_()  # a non-zero bias (the init zeroes it)
    E = C.token_embeddings(model, N).astype(np.float64)
    W, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    L = C.edge_prompt_logits(model, N)
    assert np.allclose(L, C.middle_logits(E, W, b), atol=1e-5 * np.abs(L).max())


@pytest.fixture(scope="module")
def trained_star_transformer():
    """The path-star Transformer of the default run (seed 0, 500 steps, fp32): ~5 s on a CPU."""
    torch.set_num_threads(1)
    cfg = TG.Config(graphs="path_star", arch="transformer", seeds="0")
    g = TG.make_graph("path_star", 0)
    captured = {}
    real_build = TG.build

    def keep(*a, **k):  # keep a handle on the trained model
        captured["model"] = real_build(*a, **k)
        return captured["model"]

    TG.build = keep
    try:
        run, E = TG.train_sequence("transformer", g, cfg, "cpu")
    finally:
        TG.build = real_build
    return g, run, E.astype(np.float64), captured["model"].eval()


def test_transformer_margin_does_not_depend_on_how_the_affine_fit_is_parameterised(trained_star_transformer):
    """The reviewer's case: the same fit H ~ E W^T + b written with and without the bias gave skewed
    margins of opposite signs (+0.11 / -0.35) under the old definition; the margin of the logits is one number."""
    g, run, E, model = trained_star_transformer
    N = g.num_nodes
    targets = C.neighbour_targets(C.directed_edges(g), N)
    H, L = C.edge_prompt_hidden(model, N), C.edge_prompt_logits(model, N)
    assert np.allclose(L, H @ E.T, atol=1e-4)  # tied head: the logits are H E^T
    W, b, err = C.effective_middle(E, H)
    c = np.linalg.lstsq(E, np.ones(N), rcond=None)[0]
    fits = [(W, b), (W + np.outer(b, c), np.zeros_like(b))]  # equivalent parameterisations of one fit
    for s in (0.1, 10.0):  # the old min-norm fit with its ones column scaled: other equivalent splits
        sol = np.linalg.lstsq(np.concatenate([E, s * np.ones((N, 1))], 1), H, rcond=None)[0]
        fits.append((sol[:-1].T, s * sol[-1]))
    old = [C.geometric_margin_bias_apart(E, Wf, targets, bf)["margin_skewed"] for Wf, bf in fits]
    new = [C.geometric_margin(E, C.middle_logits(E, Wf, bf), targets)["margin_skewed"] for Wf, bf in fits]
    assert err < 1e-8 and max(old) - min(old) > 0.1 and np.sign(old[0]) != np.sign(old[1])
    assert max(new) - min(new) < 1e-6
    assert abs(new[0] - run["margin_skewed"]) < 1e-3  # the script reports the margin of the model's own logits
    assert run["margin_skewed_bias_apart"] == pytest.approx(old[0], abs=1e-6)  # the old number, labelled


# ---------------------------------------------------------------------------------------------- precision
def test_tiny_graphs_trains_in_fp32(monkeypatch):
    seen = []
    real_train = C.train
    monkeypatch.setattr(C, "train", lambda model, sets, tc, *a, **k: seen.append(tc.precision) or real_train(
        model, sets, tc, *a, **k))
    cfg = TG.Config(graphs="cycle", arch="transformer", steps_scale=0.01, eval_points=2, seeds="0")
    TG.train_sequence("transformer", TG.make_graph("cycle", 0), cfg, "cpu")
    assert seen == ["fp32"]


# ---------------------------------------------------------------------------------------------- seeds, verdict
def test_seeds_are_offsets_of_seed():
    assert TG.seed_list(TG.Config()) == [0, 1, 2, 3, 4]
    assert TG.seed_list(TG.Config(seed=7, seeds="0,2")) == [7, 9]


def fake_run(graph, arch, seed, margin):
    return {"graph": graph, "arch": arch, "seed": seed, "margin_skewed": margin, "edge_topk": 1.0}


def test_sign_fractions_and_majority_rule():
    nn = [-0.16, 0.45, -0.67, 5.35, 3.34]  # the NN on the irregular graph, seeds 0-4 (old definition)
    runs = ([fake_run("irregular", "nn", s, m) for s, m in enumerate(nn)]
            + [fake_run("irregular", "associative", s, -0.5) for s in range(5)]
            + [fake_run("irregular", "transformer", s, 1.0 if s else -1.0) for s in range(5)])
    fr = TG.sign_fractions(runs, lambda r: TG.EXPECTED_SIGN[r["arch"]])
    assert fr["irregular/nn"]["fraction_expected_sign"] == pytest.approx(0.6)
    assert fr["irregular/associative"]["fraction_expected_sign"] == 1.0
    assert fr["irregular/transformer"]["expected_sign"] == "+" and fr["irregular/transformer"]["seeds"] == list(range(5))
    checks = TG.architecture_checks(runs, fr, 0.8)
    assert checks["associative_margin_negative_in_ge_0.8_of_seeds"] is True
    assert checks["nn_margin_positive_in_ge_0.8_of_seeds"] is False  # 3 of 5
    assert checks["transformer_margin_positive_in_ge_0.8_of_seeds"] is True  # 4 of 5
    assert TG.architecture_checks(runs, fr, 0.6)["nn_margin_positive_in_ge_0.6_of_seeds"] is True


def test_sign_check_needs_the_majority_on_every_graph():
    runs = ([fake_run("cycle", "nn", s, 1.0) for s in range(5)]
            + [fake_run("grid", "nn", s, 1.0 if s < 3 else -1.0) for s in range(5)])
    fr = TG.sign_fractions(runs, lambda r: TG.EXPECTED_SIGN[r["arch"]])
    assert TG.architecture_checks(runs, fr, 0.8)["nn_margin_positive_in_ge_0.8_of_seeds"] is False


# ---------------------------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("flags", [["--seeds", "0,0"], ["--seeds", "a"], ["--seeds", "-1"], ["--seeds", ""],
                                   ["--seeds", "0,,1"], ["--seeds", "\u00b2"], ["--majority", "0"], ["--majority", "1.5"],
                                   ["--seed", str(2**31 - 1), "--seeds", "0,1"], ["--study", "regularizers", "--untied"],
                                   ["--graphs", "grid,moon"], ["--arch", ""]])
def test_bad_seed_flags_exit_2_with_one_line(flags, tmp_path, capsys):
    assert_bad_input("tiny_graphs.py", flags, tmp_path, capsys)


@pytest.mark.parametrize("flags,checked", [(["--arch", "associative-fast"], None),  # memorization alone: no claim
                                           (["--untied", "--arch", "transformer"], None),  # no margin to check
                                           (["--forward-only", "--arch", "transformer"], "Transformer margin > 0")])
def test_tiny_graphs_claims_only_what_its_selection_checks(flags, checked, tmp_path):
    cfg = C.cli(TG.Config, "", TG.QUICK, TG.validate, argv=["--quick", "--seeds", "0", *flags, "--out", str(tmp_path)])
    res = TG.run(cfg)
    if checked is None:
        assert res["verdict"]["reproduced"] is None and "why_not" not in res["verdict"]
        assert "margin" not in res["claim"] and list(res["checks"]) == ["all_runs_memorize_100pct_topk"]
    else:
        assert isinstance(res["verdict"]["reproduced"], bool) and checked in res["claim"]
        assert "TinyNN" not in res["claim"] and "associative" not in res["claim"]


def test_tiny_graphs_quick_end_to_end(tmp_path):
    out = tmp_path / "tg"
    proc = run_cmd(["tiny_graphs.py", "--quick", "--device", "cpu", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert {"script", "claim", "config", "device", "seconds", "metrics", "history", "verdict"} <= set(res)
    assert isinstance(res["verdict"]["reproduced"], bool) and res["precision"] == "fp32"
    assert res["deterministic_kernels"] is True  # no flag: always on (same seed, same signs on a GPU too)
    assert res["config"]["seeds"] == "0,1" and res["config"]["majority"] == 0.8
    assert "speed" in res and not any("seconds" in k or k.endswith("_per_s") for k in res["metrics"])
    assert (out / "fig1_summary.png").exists() and (out / "arch_transformer.png").exists()
    runs, fractions = res["metrics"]["runs"], res["metrics"]["margin_sign_fractions"]
    assert {"cycle/nn/seed0", "cycle/nn/seed1"} <= set(runs)
    run = runs["cycle/nn/seed0"]
    assert np.isfinite(run["margin_skewed"]) and 0 <= run["spectral_top_fraction"] <= 1
    assert np.isfinite(run["margin_skewed_bias_apart"]) and np.isfinite(run["margin_skewed_release_style"])
    assert np.isfinite(runs["cycle/transformer/seed1"]["margin_skewed_bias_apart"])
    f = fractions["cycle/nn"]
    assert f["seeds"] == [0, 1] and f["expected_sign"] == "+" and 0 <= f["fraction_expected_sign"] <= 1
    assert fractions["cycle/associative"]["expected_sign"] == "-" and "cycle/mamba" in fractions
    assert "[signs] cycle/nn" in proc.stdout
    # the verdict's sign checks use only the margin of the logits, never the labelled alternatives
    assert all("bias_apart" not in k and "release" not in k for k in res["checks"])


def test_regularizer_study_runs_over_seeds(tmp_path):
    out = tmp_path / "reg"
    proc = run_cmd(["tiny_graphs.py", "--study", "regularizers", "--quick", "--steps-scale", "0.005",
                    "--device", "cpu", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    fr = res["metrics"]["margin_sign_fractions"]
    assert len(fr) == 7 and all(f["seeds"] == [0, 1] for f in fr.values())
    assert set(res["checks"]) == {f"sign_agrees_{k}" for k in fr} and (out / "regularizers_cycle.png").exists()
    assert fr["unit_init_lr1e-4"]["expected_sign"] == "-"  # the release's printed margin -0.749


def test_quick_config_is_two_seeds():
    assert TG.QUICK["seeds"] == "0,1" and dataclasses.replace(TG.Config(), **TG.QUICK).seeds == "0,1"


# ===================================================================================== recipe_study.py (issue 9)
def test_recipe_study_fit_and_medians():
    import recipe_study as RS
    c, alpha = RS.power_fit([100, 200, 400, 800], [50 * d ** 0.5 for d in (100, 200, 400, 800)])
    assert abs(alpha - 0.5) < 1e-9 and abs(c - 50) < 1e-6
    rows = [{"degree": 400, "seed": s, "edge_topk": 1.0, "peak_test_first_token": p, "step_50": s50, "epoch_50": s50,
             "step_90": s90, "epoch_90": s90} for s, p, s50, s90 in ((0, 0.95, 500, 1000), (1, 0.6, 750, None),
                                                                      (2, 0.5, 1000, None))]
    (t,) = RS.summarize(rows)
    assert t["step_50_median"] == 750 and t["step_90"] == [1000]
    assert t["step_90_median"] == float("inf")  # two of three never got there: the median did not either
    hist = [{"step": 0, "epoch": 0.0, "test_first_token": 0.0}, {"step": 250, "epoch": 9.1, "test_first_token": 0.93}]
    reach = lambda level: sweep.first_reach(hist, "test_first_token", level)  # noqa: E731  (what read_runs uses)
    assert reach(0.9) == (250, 9.1) and reach(0.95) == (None, None)


def test_recipe_study_levers_table_and_refusals(tmp_path, monkeypatch, capsys):
    import recipe_study as RS

    def kept_run(folder, degree, mult, seed, curve, layers=12, lr=3e-4):
        os.makedirs(tmp_path / folder)
        hist = [{"step": s, "test_first_token": a, "edge_top1_valid": 1.0, "train_first_token": 1.0} for s, a in curve]
        cfg = {"degree": degree, "embed_lr_mult": mult, "seed": seed, "lr": lr, "layers": layers, "width": 384,
               "batch_size": 256, "steps": 4000}
        json.dump({"config": cfg, "history": hist, "seconds": 12.0}, open(tmp_path / folder / "results.json", "w"))

    kept_run("gpt12x384_d400_levers/x60", 400, 60.0, 0, [(0, 0.0), (250, 0.5), (500, 0.93)])
    kept_run("gpt12x384_d400_levers/x30", 400, 30.0, 0, [(0, 0.0), (250, 0.2), (4000, 0.83)])
    kept_run("gpt12x384_d400_levers/lr", 400, 30.0, 1, [(0, 0.0), (250, 0.95)], lr=5e-4)
    kept_run("gpt12x384_d400_levers/small_model", 400, 10.0, 0, [(0, 0.0), (250, 1.0)], layers=4)  # not a 12x384
    assert RS.main(["--levers", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "levers.md").read_text().splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table if line.startswith("| embedding")}
    assert list(rows) == ["embedding x30", "embedding x60", "embedding x30, body LR 5e-4"]  # the 4x128 is left out
    assert "| never (0.83 at 4,000) |" in rows["embedding x30"] and "| 500 |" in rows["embedding x60"]
    assert (tmp_path / "levers.png").exists()
    # bad input: nothing to read, or a sweep study with no sweep points, is refused before anything is written
    assert RS.main(["--levers", "--out", str(tmp_path / "none")]) == 2
    monkeypatch.setattr(RS, "RUNS", str(tmp_path / "no_runs"))
    assert RS.main(["--out", str(tmp_path / "study")]) == 2 and not (tmp_path / "study").exists()
    assert RS.main(["--run", "--levers"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("recipe_study: ") for e in errors)  # one line each, no traceback


# ===================================================================================== CPU time check (issue 11)
def test_cpu_time_check_warns_in_one_line_and_leaves_the_model_alone(capsys):
    g = C.path_star(6, 4, seed=0)
    sets = C.in_weights_path_sets(g, 1, "first")
    torch.manual_seed(0)
    model = C.build_model("gpt", C.vocab_size(g.num_nodes), 1, 16, 2, "cpu")
    before = [p.detach().clone() for p in model.parameters()]
    tc = C.TrainConfig(steps=10 ** 9, batch_size=16, lr=1e-2)
    est = C.cpu_time_check("x", model, list(sets[:2]), tc, "cpu", "python x.py --small")
    lines = capsys.readouterr().out.strip().splitlines()
    assert est > 900 and len(lines) == 1 and "python x.py --small" in lines[0] and "s/step" in lines[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # timed on a copy
    assert C.cpu_time_check("x", model, list(sets[:2]), dataclasses.replace(tc, steps=5), "cpu", "cmd") < 900
    assert capsys.readouterr().out == ""  # a CPU-sized run says nothing


# ===================================================================================== --small presets (issue 11)
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_a_valid_small_preset(script):
    import importlib
    mod = importlib.import_module(script)
    cfg = C.cli(mod.Config, "", mod.QUICK, mod.validate, argv=["--small"], small=mod.SMALL)
    assert cfg.small and not cfg.quick
    assert all(getattr(cfg, k) == v for k, v in mod.SMALL.items())  # the preset is what runs
    assert mod.validate(cfg) is None
    # a flag the user gives wins over the preset
    name = next(iter(mod.SMALL), None)
    if name is not None and isinstance(mod.SMALL[name], int) and not isinstance(mod.SMALL[name], bool):
        flag = f"--{name.replace('_', '-')}"
        assert getattr(C.cli(mod.Config, "", mod.QUICK, mod.validate, argv=["--small", flag, str(mod.SMALL[name] + 1)],
                             small=mod.SMALL), name) == mod.SMALL[name] + 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_and_small_together_is_bad_input(script, tmp_path, capsys):
    assert_bad_input(script + ".py", ["--quick", "--small"], tmp_path, capsys)


def test_small_command_names_the_claim():
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--hardest-token", "--edges", "forward", "--model", "mamba"])
    assert S.small_command(cfg).split("  (")[0].endswith("--small --hardest-token --edges forward --model mamba")
    assert "--edges" not in S.small_command(C.cli(S.Config, "", S.QUICK, S.validate, argv=[]))
    # the reverse path's CPU scale is the claims table's: G(100,5) does not teach the leaf's copy (README row 5b)
    rev = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--reverse-path"])
    assert S.small_command(rev).split("  (")[0].endswith("--small --reverse-path --degree 400 --steps 4000")
    # staged: the preset's path stage at the edge stage's LR forgets the edges; the table's LRs (README row 5c)
    staged = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--hardest-token", "--recipe", "staged"])
    assert S.small_command(staged).split("  (")[0].endswith("--small --hardest-token --recipe staged --embed-lr-mult 3 "
                                                            "--lr 3e-5 --eval-every 100")


def test_staged_verdict_is_the_peak_and_reports_the_drop():
    """Fig 36: a high peak that does not last. Judged at the peak; the end and the drop are reported (measured at CPU
    scale, seed 0: peak 1.0, end 0.84; the preset's LRs: peak 0, the edges forgotten)."""
    import star_in_weights as S
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--hardest-token", "--recipe", "staged", "--degree", "100"])
    peaked = {**_path_final(0.84, 0, 0.47, 1, 0), "peak_test_first_token": 1.0}
    v = S.compute_verdict(cfg, peaked, 25)
    assert v["reproduced"] and v["value"] == 1.0 and v["at_end"] == 0.84 and abs(v["drop_from_peak"] - 0.16) < 1e-9
    never = {**_path_final(0.0, 0, 0.3, 1, 0), "peak_test_first_token": 0.12}
    assert not S.compute_verdict(cfg, never, 25)["reproduced"]
    assert not S.compute_verdict(cfg, {**peaked, "peak_test_first_token": 0.88}, 25)["reproduced"]  # one leaf short


# ===================================================================================== reproduction suite (issue 11)
# Every claim's --small run on the CPU, its verdict asserted: `pytest test_all.py -m reproduce` (.ci/run runs it
# after the unit tests; a plain `pytest test_all.py` skips it). A claim that honestly does not reproduce at CPU
# scale is asserted as not reproduced, with the reason it fails for (`why_not`), so that a change that flips a
# verdict either way, or makes it fail for another reason, is caught. Seeds and numbers: README, claims table.
REPRODUCE = [
    # (id, script, extra flags, reproduced?, a phrase of why_not when not reproduced (None: value < threshold));
    # reproduced None: the verdict is not asserted, only value >= VALUE_FLOOR[id]
    ("headline", "star_in_weights.py", ["--hardest-token"], True, None),
    ("forward_edges_fail", "star_in_weights.py", ["--hardest-token", "--edges", "forward"], True, None),
    ("frozen_embeddings_fail", "freeze_embeddings.py", [], True, None),
    ("in_context", "star_in_context.py", [], True, None),
    ("node2vec_spectral", "node2vec_spectral.py", [], True, None),
    # On G(400,5) with 4,000 steps (exact match 1.0 from step 3,000 at seed 0; seeds 0-2: 1.00 / 0.72 / 0.97): the first
    # reverse token copies the held-out leaf from the prompt, which the preset's G(100,5) (75 training paths) does
    # not teach (0.68 at seed 0).
    ("reverse_path_d400", "star_in_weights.py", ["--reverse-path", "--degree", "400", "--steps", "4000",
                                                 "--eval-every", "500"], True, None),
    # Both splits well above chance (T(256,2,5), exact match 0.27 and 0.41 at seed 0 against a bar of 0.10); which
    # split has the higher exact match varies with the seed (1/3 "harder", README row 9), so only the floor on the
    # verdict's value, the lower split's exact match, is asserted, as for the full path.
    ("tree_star_both_splits_above_chance", "tree_star.py", [], None, None),
    # Not over seeds 0,1,2: the NN path-star run of seed 1 has a geometric level that hardly moves (the speed
    # check). The Transformer's grid margin of seed 0 sits at zero and takes its sign from the float order
    # (CPU and torch version): -0.01 on one machine (with seed 1's -0.46 that check fails too), +0.07 on
    # another (it passes), both torch 2.13.
    ("tiny_graphs_not_over_seeds", "tiny_graphs.py", [], False, "associative_fast_le_3_steps_geometric_ge_10"),
    # With embedding x3 and the path stage at 3e-5 (1/33 of the edge stage): peak 1.0 at seed 0, then 0.84 (seeds 0-4:
    # README row 5c). The preset's LRs (the path stage at the edge stage's 1e-3, x10) forget the edges: peak 0.
    ("staged_peak", "star_in_weights.py", ["--hardest-token", "--recipe", "staged", "--embed-lr-mult", "3", "--lr",
                                           "3e-5", "--eval-every", "100"], True, None),
    # Fig 35 with its target, the full path: 0 pauses against the k = l = 5 control, mean held-out exact match over the
    # evaluations 0.26 against 0.56 (seed 0; 0.30 +- 0.03 apart over seeds 0-2, the bar is 0.04).
    ("pauses_full_path", "star_in_weights.py", ["--pauses", "0"], True, None),
    # ...and with the first hop as the only target the opposite: fewer pauses, the higher curve (0.94 against 0.81, seed 0).
    ("pauses_hardest_token_opposite", "star_in_weights.py", ["--hardest-token", "--pauses", "0"], False,
     "did not give a higher"),
    # Borderline at CPU scale: exact match 0.88 / 0.60 / 0.84 (seeds 0-2) against 0.90, seed 0 one leaf short, so
    # its verdict could flip with a CPU's rounding; asserted instead: well above chance (>= 0.5, chance 1/25).
    ("full_path_borderline", "star_in_weights.py", [], None, None),
]
VALUE_FLOOR = {"full_path_borderline": 0.5, "tree_star_both_splits_above_chance": 0.1}


@pytest.mark.reproduce
@pytest.mark.parametrize("name,script,flags,reproduced,why_not", REPRODUCE, ids=[r[0] for r in REPRODUCE])
def test_small_claim_verdict(name, script, flags, reproduced, why_not, tmp_path):
    out = tmp_path / name
    proc, res = run_script(script, "--small", "--device", "cpu", *flags, out=out, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_results_shape(res, script[:-3])
    v = res["verdict"]
    print(f"{name}: reproduced={v['reproduced']} value={v['value']} in {res['seconds']:.0f} s; {v.get('why_not', '')}")
    if reproduced is None:
        assert v["value"] >= VALUE_FLOOR[name], v
        return
    assert v["reproduced"] is reproduced, v
    if not reproduced:  # and for the reason it is known to fail for
        assert (why_not in v.get("why_not", "")) if why_not else v["value"] < v["threshold"], v


def test_mamba_release_init_switch():
    torch.manual_seed(0)
    std = C.build_model("mamba", 40, 2, 32, 1, "cpu")
    rel = C.build_model("mamba", 40, 2, 32, 1, "cpu", init="release")
    dt = torch.nn.functional.softplus(std.mixers[0].dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6  # mamba_ssm: dt log-uniform in [1e-3, 0.1]
    assert torch.all(rel.mixers[0].dt_proj.bias == 0)  # the release: softplus(0) = 0.69
    assert abs(rel.mixers[1].out_proj.weight.std().item() - 0.02) < 0.003
    assert abs(std.mixers[1].out_proj.weight.std().item() - 0.02) > 0.01  # kaiming / sqrt(L), not N(0, 0.02)
    with pytest.raises(ValueError):
        C.build_model("mamba", 40, 1, 32, 1, "cpu", init="other")
    import star_in_weights as S  # the script's switch is the release's whole block
    cfg = C.cli(S.Config, "", S.QUICK, S.validate, argv=["--quick", "--model", "mamba", "--mamba-block", "release"])
    model = S.build(cfg, "cpu")[2]
    assert not model.cfg.residual and isinstance(model.ln_f, torch.nn.Identity) and model.cfg.init == "release"
    assert S.validate(dataclasses.replace(cfg, model="gpt")) is not None  # a Mamba switch on a GPT is bad input


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_claim_script_stays_under_500_lines(script):
    with open(os.path.join(HERE, script + ".py")) as f:
        assert sum(1 for _ in f) < 500  # one self-contained script per claim, readable top to bottom
