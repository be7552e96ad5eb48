"""Diagnosis (issue 11): the kit's Mamba vs the release's block on star_in_weights --small --hardest-token.
variant=kit      x + Mamba(LN(x)), final LN, mamba-ssm init (dt bias inverse-softplus, out_proj / sqrt(L))
variant=release  Mamba(LN(x)) without residual, no final LN, every Linear re-drawn N(0, 0.02), biases 0 (dt bias too)
variant=dt0      the kit's block with only the dt bias zeroed
variant=reinit   the kit's block (residual, final LN) with the release's init
variant=release_with_residual / release_with_final_norm: the release's block with one of the two put back
                 (run in the session after the other four, side by side, 635-640 s each)
Run from the repository root, one thread (the README's row 4 numbers):
  OMP_NUM_THREADS=1 python results/small/mamba/ablation_variants.py VARIANT runs/mamba_VARIANT
("release" is the same model as `star_in_weights.py --small --hardest-token --model mamba --mamba-block release`,
which gave the same numbers.)"""
import os, sys, torch, torch.nn as nn
sys.path[:0] = [os.getcwd(), os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")]  # the repo root
import common as C
import star_in_weights as S

variant, out = sys.argv[1], sys.argv[2]
orig = C.build_model

def patched(kind, vocab, n_layer, n_embd, n_head, device, **kw):
    if kind == "mamba" and variant == "release":
        kw["residual"] = False
    if kind == "mamba" and variant == "release_with_residual":  # release init, no final norm, residual kept
        kw.update(init="release", final_norm=False)
    if kind == "mamba" and variant == "release_with_final_norm":  # release init, no residual, final norm kept
        kw.update(init="release", residual=False)
    model = orig(kind, vocab, n_layer, n_embd, n_head, device, **kw)
    if kind != "mamba":
        return model
    if variant == "release":
        model.ln_f = nn.Identity()
        for mod in model.mixers.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
    elif variant == "dt0":  # the kit's block, only the dt bias zeroed as the release's re-init did (dt = softplus(0) = 0.69)
        for mixer in model.mixers:
            nn.init.zeros_(mixer.dt_proj.bias)
    elif variant == "reinit":  # the kit's residual block and final LN with the release's init: every mixer
        for mixer in model.mixers:  # Linear re-drawn N(0, 0.02), its biases (dt bias too) zero
            for lin in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
    return model.to(device)

C.build_model = patched
cfg = C.cli(S.Config, "", S.QUICK, S.validate, small=S.SMALL,
            argv=["--small", "--hardest-token", "--model", "mamba", "--device", "cpu", "--out", out] + sys.argv[3:])
S.run(cfg)
