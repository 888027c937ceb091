"""`mom-convert from-release`: a checkpoint in the authors' release layout (GPT2MoTLMHeadModel,
built here with random weights, non-zero router biases included) imports exactly.

The reference forward below is written directly from the release-layout tensors and the model
description (spec §2-§6 + the release's GRU cell and router output layer); it shares no code
with mom_dist. Error paths: one line, exit 2, nothing overwritten.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mom_dist.cli.convert import main as convert_main
from mom_dist.checkpoint.sources import load_exported

D, HEADS, V, S = 16, 2, 50, 12


def release_config(**kw) -> dict:
    rc = dict(architectures=["GPT2MoTLMHeadModel"], model_type="gpt2-mot", vocab_size=V, n_positions=32, n_embd=D,
              n_head=HEADS, n_layer=6, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, chunks=2, num_bottom_layers=1, num_top_layers=1,
              num_attn=2, num_ffn=3, depth_per_chunk=3, depth_multiplier=4, router_type="gru_softmax", router_dim=8,
              router_softmax_temperature=0.5, enable_pause=True, require_anchor_layer=True, depthwise_bal_loss=False,
              weighted_qkv=False, routing_all_possible_path=False, routing_top_k=2, use_ste=False,
              router_aux_loss_coef=0.01, scale_attn_weights=True, tie_word_embeddings=True)
    rc.update(kw)
    return rc


def release_state_dict(rc: dict, seed: int = 0) -> dict:
    """Random weights under the release's key names and Conv1D/Linear layouts."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def ln(prefix):
        return {f"{prefix}.weight": 1 + t(D), f"{prefix}.bias": t(D)}

    def conv(prefix, d_in, d_out):  # GPT-2 Conv1D: weight (in, out)
        return {f"{prefix}.weight": t(d_in, d_out), f"{prefix}.bias": t(d_out)}

    def dense(p):
        return {**ln(f"{p}.mot_attn.attention_layernorm"), **conv(f"{p}.mot_attn.c_attn", D, 3 * D),
                **conv(f"{p}.mot_attn.c_proj", D, D), **ln(f"{p}.mot_ffn.ffn_layernorm"),
                **conv(f"{p}.mot_ffn.c_fc", D, 4 * D), **conv(f"{p}.mot_ffn.c_proj", 4 * D, D)}

    k, r = max(rc["num_attn"], rc["num_ffn"]) + 1, rc["router_dim"]

    def router(p):  # nn.Linear: weight (out, in); the output layer's bias is non-zero here
        if is_gru(rc):
            return {f"{p}.x2h.weight": t(3 * r, D, std=0.5), f"{p}.x2h.bias": t(3 * r),
                    f"{p}.h2h.weight": t(3 * r, r, std=0.5), f"{p}.h2h.bias": t(3 * r),
                    f"{p}.router.weight": t(k, r, std=1.0), f"{p}.router.bias": t(k, std=1.0)}
        return {f"{p}.router.0.weight": t(r, D, std=0.5), f"{p}.router.0.bias": t(r),
                f"{p}.router.2.weight": t(k, r, std=1.0), f"{p}.router.2.bias": t(k, std=1.0)}

    sd = {"transformer.wte.weight": t(V, D), "transformer.wpe.weight": t(rc["n_positions"], D),
          "transformer.ln_f.weight": 1 + t(D), "transformer.ln_f.bias": t(D)}
    i = 0
    for kind in layer_kinds(rc):
        p = f"transformer.h.{i}"
        if kind == "dense":
            sd.update(dense(p))
        else:
            for m in range(rc["num_attn"]):
                sd.update(ln(f"{p}.mot_attn.attention_layernorm.{m}"))
                sd.update(conv(f"{p}.mot_attn.c_attn.{m}", D, 3 * D))
                sd.update(conv(f"{p}.mot_attn.c_proj.{m}", D, D))
            for m in range(rc["num_ffn"]):
                sd.update(ln(f"{p}.mot_ffn.ffn_layernorm.{m}"))
                sd.update(conv(f"{p}.mot_ffn.c_fc.{m}", D, 4 * D))
                sd.update(conv(f"{p}.mot_ffn.c_proj.{m}", 4 * D, D))
            sd.update(router(f"{p}.mot_attn.router"))
            sd.update(router(f"{p}.mot_ffn.router"))
        i += 1
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def is_gru(rc) -> bool:
    """The release's get_router (and each module's forward) tests "naive" before "gru": a
    router_type naming both builds MLP routers."""
    return "naive" not in rc["router_type"] and "gru" in rc["router_type"]


def layer_kinds(rc):
    kinds = ["dense"] * rc["num_bottom_layers"]
    for _ in range(rc["chunks"]):
        kinds += ["block"] + (["dense"] if rc["require_anchor_layer"] else [])
    return kinds + ["dense"] * rc["num_top_layers"]


# ---------------------------------------------------------------- reference forward (release layout)
def _ln(x, sd, p):
    return F.layer_norm(x, (D,), sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)


def _conv(x, sd, p):
    return x @ sd[f"{p}.weight"] + sd[f"{p}.bias"]


def _attend(qkv):
    B, T, _ = qkv.shape
    q, k, v = (z.view(B, T, HEADS, D // HEADS).transpose(1, 2) for z in qkv.split(D, -1))
    w = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
    w = w.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(B, T, D)


def _router(x, h, sd, p, rc):
    if is_gru(rc):
        gx, gh = x @ sd[f"{p}.x2h.weight"].T + sd[f"{p}.x2h.bias"], h @ sd[f"{p}.h2h.weight"].T + sd[f"{p}.h2h.bias"]
        (xr, xz, xn), (hr, hz, hn) = gx.chunk(3, -1), gh.chunk(3, -1)
        reset, update = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        new = torch.tanh(xn + reset * hn)
        h = new + update * (h - new)
        score = h @ sd[f"{p}.router.weight"].T + sd[f"{p}.router.bias"]
    else:
        score = F.relu(x @ sd[f"{p}.router.0.weight"].T + sd[f"{p}.router.0.bias"]) @ sd[f"{p}.router.2.weight"].T \
            + sd[f"{p}.router.2.bias"]
    return torch.softmax(score / rc["router_softmax_temperature"], -1), h


def reference_forward(sd, rc, ids):
    """Logits and the release's auxiliary (balance) loss."""
    B, T = ids.shape
    x = sd["transformer.wte.weight"][ids] + sd["transformer.wpe.weight"][torch.arange(T)]
    scores = []  # (attn probs, ffn probs) per chunk and step
    for i, kind in enumerate(layer_kinds(rc)):
        p = f"transformer.h.{i}"
        if kind == "dense":
            x = x + _conv(_attend(_conv(_ln(x, sd, f"{p}.mot_attn.attention_layernorm"), sd, f"{p}.mot_attn.c_attn")),
                          sd, f"{p}.mot_attn.c_proj")
            x = x + _conv(F.gelu(_conv(_ln(x, sd, f"{p}.mot_ffn.ffn_layernorm"), sd, f"{p}.mot_ffn.c_fc"),
                                 approximate="tanh"), sd, f"{p}.mot_ffn.c_proj")
            continue
        ha = hf = torch.zeros(B, T, rc["router_dim"])
        for _ in range(rc["depth_per_chunk"]):
            pa, ha = _router(x, ha, sd, f"{p}.mot_attn.router", rc)
            top, ids_a = pa.topk(rc["routing_top_k"], -1)
            wa = top / top.sum(-1, keepdim=True)
            qkv, picks = 0, []
            for m in range(rc["num_attn"]):
                sel = (ids_a == m).any(-1, keepdim=True).float()  # QKV mixed unweighted (weighted_qkv: w)
                w = (wa * (ids_a == m)).sum(-1, keepdim=True)
                qkv = qkv + (w if rc["weighted_qkv"] else sel) * _conv(
                    _ln(x, sd, f"{p}.mot_attn.attention_layernorm.{m}"), sd, f"{p}.mot_attn.c_attn.{m}")
                picks.append(w)
            att = _attend(qkv)
            x = x + sum(picks[m] * _conv(att, sd, f"{p}.mot_attn.c_proj.{m}") for m in range(rc["num_attn"]))
            pf, hf = _router(x, hf, sd, f"{p}.mot_ffn.router", rc)
            top, ids_f = pf.topk(rc["routing_top_k"], -1)
            wf = top / top.sum(-1, keepdim=True)
            upd = 0
            for m in range(rc["num_ffn"]):
                w = (wf * (ids_f == m)).sum(-1, keepdim=True)
                h = F.gelu(_conv(_ln(x, sd, f"{p}.mot_ffn.ffn_layernorm.{m}"), sd, f"{p}.mot_ffn.c_fc.{m}"), approximate="tanh")
                upd = upd + w * _conv(h, sd, f"{p}.mot_ffn.c_proj.{m}")
            x = x + upd
            scores.append((pa.reshape(B * T, -1), pf.reshape(B * T, -1)))
    logits = F.layer_norm(x, (D,), sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], 1e-5) \
        @ sd["transformer.wte.weight"].T

    def bal(probs):  # the release's loss: softmax again, top-1 fractions x mean probabilities, times C
        q = probs.softmax(-1)
        C = q.shape[-1]
        return C * (F.one_hot(q.argmax(-1), C).float().mean(0) * q.mean(0)).sum()

    if rc["depthwise_bal_loss"]:
        aux = sum(bal(a) + bal(f) for a, f in scores) / len(scores)
    else:
        aux = bal(torch.cat([a for a, _ in scores])) + bal(torch.cat([f for _, f in scores]))
    return logits, aux


def write_release(path, rc, sd, fmt="bin"):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(rc, f)
    if fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"},
                  os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.mark.parametrize("variant", [
    dict(fmt="bin"),
    dict(fmt="safetensors", depthwise_bal_loss=True, routing_top_k=1, num_attn=3, num_ffn=2),
    dict(fmt="bin", router_type="naive_softmax", require_anchor_layer=False, weighted_qkv=True),
    dict(fmt="bin", router_type="naive_gru_softmax", require_anchor_layer=False, weighted_qkv=True),
    dict(fmt="safetensors", output_router_logits=False),
])
def test_imported_release_checkpoint_computes_what_the_release_computes(tmp_path, capsys, variant):
    variant = dict(variant)
    fmt = variant.pop("fmt")
    rc = release_config(**variant)
    sd = release_state_dict(rc)
    src = write_release(tmp_path / "release", rc, sd, fmt)
    assert convert_main(["from-release", src, "-o", str(tmp_path / "ours")]) == 0
    model = load_exported(str(tmp_path / "ours"))
    # the release adds its aux loss only with output_router_logits (default true)
    coef = rc["router_aux_loss_coef"] if rc.get("output_router_logits", True) else 0.0
    assert model.cfg.balance_coef == coef
    ids = torch.randint(0, V, (3, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits, want_aux = reference_forward(sd, rc, ids)
        out = model(ids, ids)
    # float32 over ~10 layers in another summation order: 1e-5 of the logits' scale
    assert (out.logits - want_logits).abs().max().item() <= 1e-5 * max(1.0, want_logits.abs().max().item())
    torch.testing.assert_close(out.balance_loss, want_aux, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + coef * want_aux, rtol=1e-5, atol=1e-6)
    # the router biases made a difference: zeroing them changes the picks and the logits
    assert any(float(p.detach().abs().max()) > 0.1 for n, p in model.named_parameters() if n.endswith("head_bias")) or \
        not is_gru(rc)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("head_bias", "head.bias")):
                p.zero_()
        assert (model(ids).logits - want_logits).abs().max().item() > 1e-3


def _mutated(name):
    rc, sd = release_config(), None
    sd = release_state_dict(rc)
    if name == "missing key":
        del sd["transformer.h.3.mot_attn.c_attn.1.weight"]
    elif name == "extra key":
        sd["transformer.h.9.mot_ffn.c_fc.weight"] = torch.zeros(D, 4 * D)
    elif name == "shape mismatch":
        sd["transformer.h.3.mot_ffn.c_fc.2.weight"] = torch.zeros(D, 3 * D)
    elif name == "wrong embedding shape":
        sd["transformer.wpe.weight"] = torch.zeros(8, D)
    elif name == "unknown architecture":
        rc["architectures"] = ["GPT2LMHeadModel"]
    elif name == "unsupported setting":
        rc["use_ste"] = True
    return rc, sd


@pytest.mark.parametrize("case,message", [
    ("missing key", "lacks 'h.3.mot_attn.c_attn.1.weight'"),
    ("extra key", "does not account for"),
    ("shape mismatch", "shape mismatch among the modules of transformer.h.3.mot_ffn.c_fc"),
    ("wrong embedding shape", r"shape mismatch for wpe.weight: the release checkpoint has \(8, 16\)"),
    ("unknown architecture", "architecture \\['GPT2LMHeadModel'\\], not the release's GPT2MoTLMHeadModel"),
    ("unsupported setting", "use_ste=true"),
])
def test_bad_release_checkpoints_fail_with_one_line(tmp_path, capsys, case, message):
    import re

    rc, sd = _mutated(case)
    src = write_release(tmp_path / "release", rc, sd)
    capsys.readouterr()
    assert convert_main(["from-release", src, str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mom-convert: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "ours").exists()  # nothing half-written
    assert sorted(os.listdir(src)) == ["config.json", "pytorch_model.bin"]  # the source is untouched


def test_unreadable_sources_and_existing_outputs(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(release_config()))
    (bad / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    good = write_release(tmp_path / "good", release_config(), release_state_dict(release_config()))
    for argv, message in (([str(bad), str(tmp_path / "o1")], "cannot read the weights"),
                          ([str(tmp_path / "empty"), str(tmp_path / "o2")], "holds no config.json"),
                          ([str(tmp_path / "nowhere"), str(tmp_path / "o3")], "is not a directory"),
                          ([good, str(out)], "exists and is not empty; choose another output or pass --overwrite")):
        capsys.readouterr()
        assert convert_main(["from-release", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mom-convert: error: ") and message in err, err
    assert (out / "keep.txt").read_text() == "user data" and sorted(os.listdir(out)) == ["keep.txt"]


def test_imported_directory_starts_a_training_run(tmp_path):
    # train.init_from takes an exported directory (the trainer calls init_from_source)
    from mom_dist.config import load_config
    from mom_dist.checkpoint.sources import init_from_source
    from mom_dist.model import MoMModel

    rc = release_config()
    src = write_release(tmp_path / "release", rc, release_state_dict(rc))
    assert convert_main(["from-release", src, str(tmp_path / "ours")]) == 0
    imported = load_exported(str(tmp_path / "ours"))
    cfg = load_config(None, [f"model={json.dumps(json.loads((tmp_path / 'ours' / 'mom_config.json').read_text()))}",
                             "train.seq_len=16"])
    model = MoMModel(cfg.model)
    init_from_source(model, str(tmp_path / "ours"))
    for (n, p), q in zip(model.state_dict().items(), imported.state_dict().values()):
        assert torch.equal(p, q), n


def test_output_is_dash_o_like_every_subcommand_and_the_positional_still_works(tmp_path, capsys):
    rc = release_config()
    src = write_release(tmp_path / "release", rc, release_state_dict(rc))
    assert convert_main(["from-release", src, "-o", str(tmp_path / "a")]) == 0  # as export/to-hf/from-hf
    assert convert_main(["from-release", src, str(tmp_path / "b")]) == 0  # the earlier spelling
    assert convert_main(["from-release", src, str(tmp_path / "c"), "-o", str(tmp_path / "c")]) == 0  # both, agreeing
    for name in "abc":
        assert (tmp_path / name / "model.safetensors").exists()
    capsys.readouterr()
    for argv, message in (([src, str(tmp_path / "d"), "-o", str(tmp_path / "e")], "two different output directories"),
                          ([src], "needs an output directory: mom-convert from-release SRC -o OUT_DIR")):
        assert convert_main(["from-release", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mom-convert: error: ") and message in err, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
