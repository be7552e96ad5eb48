"""Diagnosis (issue 11): the kit's Mamba vs the release's block on star_in_weights --small --hardest-token.
variant=kit      x + Mamba(LN(x)), final LN, mamba-ssm init (dt bias inverse-softplus, out_proj / sqrt(L))
variant=release  Mamba(LN(x)) without residual, no final LN, every Linear re-drawn N(0, 0.02), biases 0 (dt bias too)
variant=dt0      the kit's block with only the dt bias zeroed
variant=reinit   the kit's block (residual, final LN) with the release's init
variant=release_with_residual / release_with_final_norm: the release's block with one of the two put back
                 (run in the session after the other four, side by side, 635-640 s each)
Every variant but dt0 is a MambaConfig (init, residual, final_norm); "release" is the same model as
`star_in_weights.py --small --hardest-token --model mamba --mamba-block release`. The stored results were
made by an earlier form of this file that re-drew the weights by hand after building the kit's model (the
same draws in the same order), and before Mamba's dt tensor was made contiguous (README row 4).
Run from the repository root, one thread (the README's row 4 numbers):
  OMP_NUM_THREADS=1 python results/small/mamba/ablation_variants.py VARIANT runs/mamba_VARIANT"""
import os, sys, torch.nn as nn
sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")]  # the repo root
import common as C
import star_in_weights as S

VARIANTS = {"kit": {}, "dt0": {}, "reinit": dict(init="release"),
            "release": dict(init="release", residual=False, final_norm=False),
            "release_with_residual": dict(init="release", final_norm=False),
            "release_with_final_norm": dict(init="release", residual=False)}
variant, out = sys.argv[1], sys.argv[2]
orig = C.build_model


def patched(kind, vocab, n_layer, n_embd, n_head, device, **kw):
    model = orig(kind, vocab, n_layer, n_embd, n_head, device, **kw, **(VARIANTS[variant] if kind == "mamba" else {}))
    if kind == "mamba" and variant == "dt0":  # only the dt bias zeroed, as the release's re-init did (dt = 0.69)
        for mixer in model.mixers:
            nn.init.zeros_(mixer.dt_proj.bias)
    return model


C.build_model = patched
cfg = C.cli(S.Config, "", S.QUICK, S.validate, small=S.SMALL,
            argv=["--small", "--hardest-token", "--model", "mamba", "--device", "cpu", "--out", out] + sys.argv[3:])
S.run(cfg)
