"""Checkpoint conversion round trips: training run (EP2) -> exported model -> same numbers;
vanilla GPT-2 case -> transformers GPT2LMHeadModel, routed MoM -> transformers MoMForCausalLM
(trust_remote_code) -> same logits; mom-eval on indexed data."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from mom_dist.checkpoint.exported import export_run
from mom_dist.checkpoint.sources import load_exported
from mom_dist.convert.hf import export_hf, export_hf_gpt2
from mom_dist.data.loader import write_token_documents
from tests.dist_utils import ROOT, run_workers
from tests.parallel.test_layout_invariance import BASE, CASES, params

VANILLA = ["model.n_bottom=0", "model.n_top=0", "model.n_attn_modules=2", "model.n_ffn_modules=2",
           "model.n_steps=2", "model.balance_coef=0",
           "model.attn_router={kind: mlp, dim: 8, top_k: 1, allow_skip: false, schedule: diagonal}",
           "model.ffn_router={kind: mlp, dim: 8, top_k: 1, allow_skip: false, schedule: diagonal}"]


def trained(tmp_path, name, world, extra):
    out = tmp_path / name
    run_workers("train_once", world, dict(config="configs/tiny.yaml", dump=str(tmp_path / name),
                                          overrides=BASE + extra + [f"train.out_dir={out}", "train.save_interval=6"]),
                tmp_path)
    return out


def test_export_round_trip_keeps_every_weight_and_the_logits(tmp_path):
    run = trained(tmp_path, "ep2", 2, CASES["k2"] + ["parallel.ep_size=2"])
    model = load_exported(export_run(str(run), str(tmp_path / "export")))
    trained_params = params(tmp_path, "ep2")
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0].endswith("_pool"):
            for i in range(p.shape[0]):
                assert torch.equal(p[i], trained_params[f"{name}[{i}]"]), name
        else:
            assert torch.equal(p, trained_params[name]), name
    ids = torch.randint(0, 64, (2, 16))
    direct = load_exported(str(run))  # reading the run directory directly gives the same model
    torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_run(str(run), str(tmp_path / "export"))


def test_vanilla_run_exports_to_transformers_gpt2(tmp_path):
    run = trained(tmp_path, "vanilla", 1, VANILLA)
    model = load_exported(str(run))
    hf_dir = export_hf(model, str(tmp_path / "hf"))
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()  # stock transformers, no remote code
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-5


def test_routed_run_exports_to_transformers_with_remote_code(tmp_path):
    routed = load_exported(str(trained(tmp_path, "routed", 1, CASES["k2"])))
    with pytest.raises(ValueError, match="only the vanilla special case"):
        export_hf_gpt2(routed, str(tmp_path / "gpt2"))
    hf = AutoModelForCausalLM.from_pretrained(export_hf(routed, str(tmp_path / "hf")), trust_remote_code=True).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (hf(ids).logits - routed(ids).logits).abs().max().item() <= 1e-5
        # labels follow transformers' convention (shifted inside)
        out = hf(ids, labels=ids)
        assert abs(out.lm_loss.item() - routed(ids[:, :-1], ids[:, 1:]).lm_loss.item()) < 1e-5
        # Left padding: padded keys are hidden and positions count real tokens only, so the
        # real tokens get the logits of the unpadded sequence (no NaN on padding rows).
        pad = torch.cat([torch.zeros(2, 4), torch.ones(2, 12)], 1).long()
        padded = hf(ids, attention_mask=pad).logits
        assert torch.isfinite(padded).all()
        assert (padded[:, 4:] - routed(ids[:, 4:]).logits).abs().max().item() <= 1e-5


def test_mom_eval_and_convert_clis(tmp_path):
    run = trained(tmp_path, "cli", 1, CASES["k1"])
    g = torch.Generator().manual_seed(0)
    write_token_documents(str(tmp_path / "val"), [torch.randint(1, 64, (50,), generator=g).tolist()
                                                  for _ in range(4)], 64)
    out = subprocess.run([sys.executable, "-m", "mom_dist.cli.evaluate", str(run), "--data", str(tmp_path / "val"),
                          "--seq-len", "16"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert "mom-eval" in out.stderr  # progress bar
    assert res["tokens"] == 12 * 16 and 1 < res["perplexity"] < 64 * 4
    conv = subprocess.run([sys.executable, "-m", "mom_dist.cli.convert", "to-hf", str(run), "-o", str(tmp_path / "x"),
                           "--no-tokenizer"], cwd=ROOT, capture_output=True, text=True)
    assert conv.returncode == 0 and (tmp_path / "x" / "modeling_mom.py").exists(), conv.stderr
    again = subprocess.run([sys.executable, "-m", "mom_dist.cli.convert", "to-hf", str(run), "-o", str(tmp_path / "x"),
                            "--no-tokenizer"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    # mom-eval reads the to-hf directory too, with the same numbers as the run directory
    from_hf = subprocess.run([sys.executable, "-m", "mom_dist.cli.evaluate", str(tmp_path / "x"), "--data",
                              str(tmp_path / "val"), "--seq-len", "16", "--no-progress"], cwd=ROOT, capture_output=True,
                             text=True)
    assert from_hf.returncode == 0 and json.loads(from_hf.stdout) == res, from_hf.stderr


def test_phase2_from_our_vanilla_run_and_from_hf(tmp_path):
    from mom_dist.config import load_config
    from mom_dist.checkpoint.sources import init_from_source
    from mom_dist.model import MoMModel

    vanilla_run = trained(tmp_path, "v", 1, VANILLA)
    vanilla = load_exported(str(vanilla_run))
    mom_over = BASE + ["model.n_bottom=0", "model.n_top=0", "model.n_attn_modules=2", "model.n_ffn_modules=2",
                       "model.n_steps=3"]
    mom = MoMModel(load_config("configs/tiny.yaml", mom_over).model)
    init_from_source(mom, str(vanilla_run))  # decomposition: layer j -> module j of each pool
    for j in range(2):
        torch.testing.assert_close(mom.chunks[0].attn_pool.qkv_weight[j], vanilla.chunks[0].attn_pool.qkv_weight[j])
        torch.testing.assert_close(mom.chunks[0].ffn_pool.fc_weight[j], vanilla.chunks[0].ffn_pool.fc_weight[j])
    assert torch.equal(mom.ln_f.weight, vanilla.ln_f.weight)

    # The trainer takes the same source (train.init_from) and trains from it.
    res = run_workers("train_once", 1, dict(config="configs/tiny.yaml", overrides=mom_over + [
        f"train.init_from={vanilla_run}", f"train.out_dir={tmp_path / 'p2'}", "train.steps=2"]), tmp_path)[0]
    assert res["steps_done"] == 2 and all(l == l for l in res["losses"])

    # mom-convert from-hf: a transformers GPT-2 directory -> an exported MoM
    hf_dir = export_hf(vanilla, str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "mom_dist.cli.convert", "from-hf", hf_dir, "--config", "configs/tiny.yaml",
           "-o", str(tmp_path / "fromhf")] + [a for o in mom_over for a in ("--set", o)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from_hf = load_exported(str(tmp_path / "fromhf"))
    torch.testing.assert_close(from_hf.chunks[0].ffn_pool.proj_weight, vanilla.chunks[0].ffn_pool.proj_weight)
