"""``mom-prune`` (issue 14, item 1): removing modules the routers never pick changes no logit; the
usage table counts what the routers picked; the pruned model is a normal model (mom-eval,
mom-convert to-hf, transformers, mom-finetune, train.init_from at EP2 in two real processes);
every bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mom_dist.cli.prune import main as mom_prune
from mom_dist.checkpoint.exported import save_exported
from mom_dist.checkpoint.sources import load_exported
from mom_dist.data.loader import write_token_documents
from mom_dist.model import ModelConfig, MoMModel, RouterConfig
from mom_dist.model.config import gpt2_config
from tests.dist_utils import ROOT, run_workers
from tests.export.test_mom_eval import snapshot
from tests.parallel.test_layout_invariance import BASE

GRU = dict(kind="gru", dim=8, temperature=0.5)
NEVER = -1.0e4  # a router bias that gives a class probability exactly 0


def tiny_cfg(**overrides) -> ModelConfig:
    kw = dict(vocab_size=64, max_seq_len=16, d_model=16, n_heads=2, n_bottom=1, n_top=1, n_chunks=2,
              n_attn_modules=4, n_ffn_modules=4, n_steps=3, z_loss_coef=0.01)
    kw.update(overrides)
    return ModelConfig(**kw)


def never_pick(model: MoMModel, pool: str, per_chunk: dict) -> None:
    """Make the routers of ``pool`` never pick the modules ``per_chunk[c]`` (probability exactly 0).

    Router biases get random values first, as in a trained model: at initialisation they are 0, so a
    token whose MLP-router hidden layer is all zero (ReLU) scores every class exactly alike, and
    torch.topk breaks such exact ties by position, which pruning renumbers."""
    for c, modules in per_chunk.items():
        router = getattr(model.chunks[c], f"{pool}_router")
        with torch.no_grad():
            for bias in (getattr(router.head, "bias", None), getattr(router, "head_bias", None)):
                if bias is not None:
                    bias.normal_(0.0, 0.5)
            if router.cfg.kind == "mlp":
                router.head.bias[modules] = NEVER
            elif getattr(router, "head_bias", None) is not None:
                router.head_bias[modules] = NEVER
            else:  # no bias: pin GRU unit 0 to 1 (update gate ~0, candidate tanh(50) = 1), weight it -1e4
                r, cell = router.cfg.dim, router.cell
                for w in (cell.weight_ih, cell.weight_hh):
                    w[[0, r, 2 * r]] = 0.0
                cell.bias_ih[[0, r, 2 * r]] = torch.tensor([0.0, -50.0, 50.0])
                cell.bias_hh[[0, r, 2 * r]] = 0.0
                router.head.weight[modules, 0] = NEVER


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune")
    g = torch.Generator().manual_seed(0)
    write_token_documents(str(d / "val"), [torch.randint(2, 64, (90,), generator=g).tolist() + [1] for _ in range(8)],
                          64, eod=1)
    return d


def prune(args, capsys):
    code = mom_prune(args)
    out, err = capsys.readouterr()
    return code, out, err


CASES = {
    # GRU attention router with biases (the release's), top-1; stateless FFN router, top-2, raw weights
    "bias_k1_mlp_raw": dict(router_bias=True, attn_router=RouterConfig(**GRU, top_k=1),
                            ffn_router=RouterConfig(kind="mlp", dim=8, top_k=2, weighting="raw")),
    # GRU routers without biases, top-2 renormalised: the pruned model needs router_bias for its new SKIP class
    "nobias_k2_renorm": dict(attn_router=RouterConfig(**GRU, top_k=2, weighting="renorm"),
                             ffn_router=RouterConfig(**GRU, top_k=1), qkv_weighted=True, mask_skip_keys=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_removing_never_picked_modules_changes_no_logit(world, case, tmp_path, capsys):
    # init_std 0.3: modules whose outputs matter (at 0.02 a changed pick moves a logit by < 1e-6)
    cfg = tiny_cfg(**CASES[case], init_std=0.3)
    torch.manual_seed(1)
    model = MoMModel(cfg).eval()
    never_pick(model, "attn", {0: [1, 2], 1: [0, 3]})  # --attn-keep 0.5: 2 of 4 go
    never_pick(model, "ffn", {0: [0], 1: [2]})  # --ffn-keep 0.75: 1 of 4 goes
    src = save_exported(str(tmp_path / "src"), cfg, model.state_dict())
    code, out, err = prune([src, "-o", str(tmp_path / "out"), "--attn-keep", "0.5", "--ffn-keep", "0.75",
                            "--data", str(world / "val"), "--batch-size", "4", "--max-batches", "4", "--no-progress"],
                           capsys)
    assert code == 0, err
    table = json.loads((tmp_path / "out" / "prune_table.json").read_text())
    assert table["kept"] == {"0.attn": [0, 3], "0.ffn": [1, 2, 3], "1.attn": [1, 2], "1.ffn": [0, 1, 3]}
    removed = [r for r in table["rows"] if r["kept"] is False]
    assert len(removed) == 6 and all(r["usage"] == 0.0 and r["score"] == 0.0 for r in removed)
    assert "REMOVED" in out and "usage" in out
    pruned = load_exported(str(tmp_path / "out"))
    assert (pruned.cfg.n_attn_modules, pruned.cfg.n_ffn_modules, pruned.cfg.n_classes) == (2, 3, 4)
    assert pruned.cfg.router_bias  # the attention routers' new (second) SKIP class needs a bias
    if not cfg.router_bias:
        assert "model.router_bias: false -> true" in out
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(ids), pruned(ids)
    assert (a.logits - b.logits).abs().max().item() <= 1e-6
    for ra, rb in zip(a.routing, b.routing):  # the same probabilities and picks, renumbered
        n_old, n_new = ra.n_modules, rb.n_modules
        kept = torch.tensor(table["kept"][f"{ra.chunk}.{ra.pool}"])
        rows = kept.tolist() + [cfg.n_classes - 1]  # + the one SKIP class these routers had
        torch.testing.assert_close(rb.probs_TC[:, :len(rows)], ra.probs_TC[:, rows], rtol=0, atol=1e-6)
        assert (rb.probs_TC[:, len(rows):] == 0).all()  # a new SKIP class is never picked
        assert torch.equal(torch.where(rb.ids_TK < n_new, kept[rb.ids_TK.clamp(max=n_new - 1)], n_old),
                           torch.where(ra.ids_TK < n_old, ra.ids_TK, n_old))
    assert table["loss_after"] == pytest.approx(table["loss_before"], abs=1e-6)


def test_usage_is_the_share_of_picks_summed_over_steps(world, tmp_path, capsys):
    """Counted independently here (bincount over the picks of the same windows) vs the table."""
    cfg = tiny_cfg(n_chunks=1, attn_router=RouterConfig(**GRU, top_k=2), ffn_router=RouterConfig(**GRU, top_k=1))
    torch.manual_seed(3)
    model = MoMModel(cfg).eval()
    src = save_exported(str(tmp_path / "src"), cfg, model.state_dict())
    code, out, err = prune([src, "-o", str(tmp_path / "out"), "--attn-keep", "0.75", "--data", str(world / "val"),
                            "--seq-len", "16", "--batch-size", "4", "--max-batches", "2", "--no-progress"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "prune_table.json").read_text())["rows"]
    from mom_dist.evaluate.perplexity import read_tokens

    tokens = read_tokens(str(world / "val"))
    x = torch.stack([tokens[i * 16:i * 16 + 16] for i in range(8)])  # 2 batches of 4 windows
    expect = {}
    with torch.no_grad():
        for rec in model(x).routing:
            counts = torch.bincount(rec.ids_TK.reshape(-1), minlength=rec.probs_TC.shape[-1]).double()
            share = counts / rec.ids_TK.numel()
            for m in range(rec.n_modules):
                expect[(rec.pool, m)] = expect.get((rec.pool, m), 0.0) + share[m].item()
            expect[(rec.pool, "SKIP")] = expect.get((rec.pool, "SKIP"), 0.0) + share[rec.n_modules:].sum().item()
    got = {(r["pool"], r["module"]): r["usage"] for r in rows}
    assert got.keys() == expect.keys()
    for k in expect:
        assert got[k] == pytest.approx(expect[k], abs=1e-12), k
    attn = sorted((r for r in rows if r["pool"] == "attn" and r["module"] != "SKIP"), key=lambda r: -r["usage"])
    assert [r["kept"] for r in attn] == [True, True, True, False]  # the least used one goes
    assert sum(r["usage"] for r in rows if r["pool"] == "ffn") == pytest.approx(cfg.n_steps)


@pytest.fixture(scope="module")
def pruned_tiny(world, tmp_path_factory):
    """configs/tiny.yaml's model (as the tests shrink it; GRU routers without bias), pruned to 2 of 4 attention
    modules (all 4 FFN modules kept), so the attention routers get two dead SKIP classes and a bias."""
    from mom_dist.config import load_config

    d = tmp_path_factory.mktemp("pruned")
    cfg = load_config("configs/tiny.yaml", BASE).model
    torch.manual_seed(4)
    src = save_exported(str(d / "src"), cfg, MoMModel(cfg).state_dict())
    cmd = [sys.executable, os.path.join(ROOT, "tools", "prune.py"), src, "-o", str(d / "out"), "--attn-keep", "0.5",
           "--by", "score", "--data", str(world / "val"), "--to-hf", str(d / "hf"),
           "--no-tokenizer", "--no-progress"]
    proc = subprocess.run(cmd, cwd=str(d), capture_output=True, text=True)  # the shim, from another directory
    assert proc.returncode == 0, proc.stderr
    return dict(dir=d, out=str(d / "out"), hf=str(d / "hf"), stdout=proc.stdout)


def test_pruned_model_is_read_by_mom_eval_and_to_hf(world, pruned_tiny, capsys):
    from transformers import AutoModelForCausalLM

    from mom_dist.cli.convert import main as mom_convert
    from mom_dist.cli.evaluate import main as mom_eval

    table = json.loads(open(os.path.join(pruned_tiny["out"], "prune_table.json")).read())
    assert table["by"] == "score" and table["n_attn_modules"] == [4, 2] and table["n_ffn_modules"] == [4, 4]
    assert "model.attn_router.top_k" not in pruned_tiny["stdout"] and "model.router_bias=true" in pruned_tiny["stdout"]
    assert mom_eval([pruned_tiny["out"], "--data", str(world / "val"), "--seq-len", "16", "--max-batches", "16",
                     "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss"] == pytest.approx(table["loss_after"], rel=1e-6)  # the same windows, the same model
    hf_dir = str(pruned_tiny["dir"] / "hf2")
    assert mom_convert(["to-hf", pruned_tiny["out"], "-o", hf_dir, "--no-tokenizer"]) == 0
    pruned = load_exported(pruned_tiny["out"])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for d in (hf_dir, pruned_tiny["hf"]):
            hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
            assert (hf(ids).logits - pruned(ids).logits).abs().max().item() <= 1e-5


def test_recovery_training_from_the_pruned_model_at_ep2(pruned_tiny, tmp_path):
    """train.init_from with the overrides mom-prune printed, on 2 real processes with ep_size=2."""
    from mom_dist.config import load_config
    from mom_dist.checkpoint.sources import init_from_source

    line = [ln for ln in pruned_tiny["stdout"].splitlines() if "recovery training" in ln][0]
    sets = line.split("--set ")[1:]
    overrides = BASE + [s.strip() for s in sets] + ["parallel.ep_size=2", "train.steps=2",
                                                     f"train.out_dir={tmp_path / 'rec'}"]
    assert f"train.init_from={pruned_tiny['out']}" in overrides
    cfg = load_config("configs/tiny.yaml", overrides)
    model = MoMModel(cfg.model)
    init_from_source(model, pruned_tiny["out"])  # what the trainer calls
    for k, v in load_exported(pruned_tiny["out"]).state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    res = run_workers("train_once", 2, dict(config="configs/tiny.yaml", overrides=overrides), tmp_path)
    assert res[0]["steps_done"] == 2 and all(torch.isfinite(torch.tensor(r["losses"])).all() for r in res)
    bad = load_config("configs/tiny.yaml", overrides[:-3])
    bad.parallel.ep_size = 4
    with pytest.raises(ValueError, match="must divide model.n_attn_modules=2"):
        bad.validate()


def test_top_k_cap_and_fewer_skip_classes():
    """N_A=2 < N_F=4: each attention router has 3 SKIP classes; pruning the FFN pool to 2 leaves room
    for 1, so the most probable one stays; top_k=4 is capped at the 3 classes left."""
    from mom_dist.evaluate.prune import PoolStats, prune_state

    cfg = tiny_cfg(n_chunks=1, n_attn_modules=2, router_bias=True, attn_router=RouterConfig(**GRU, top_k=4),
                   ffn_router=RouterConfig(kind="mlp", dim=8, top_k=1))
    sd = MoMModel(cfg).state_dict()
    sd["chunks.0.attn_router.head_bias"] = torch.arange(5.0)
    pools = {(0, "attn"): PoolStats(0, "attn", 2, [1.0, 1.0], [0.1, 0.1, 0.1, 0.5, 0.2], 1.0),
             (0, "ffn"): PoolStats(0, "ffn", 4, [1.0] * 4, [0.2] * 5, 1.0)}
    new, out, notes = prune_state(cfg, sd, {(0, "attn"): [0, 1], (0, "ffn"): [1, 3]}, pools)
    assert (new.n_attn_modules, new.n_ffn_modules, new.n_classes, new.attn_router.top_k) == (2, 2, 3, 3)
    assert out["chunks.0.attn_router.head_bias"].tolist() == [0.0, 1.0, 3.0]  # class 3: the most probable SKIP
    assert torch.equal(out["chunks.0.attn_router.head.weight"], sd["chunks.0.attn_router.head.weight"][[0, 1, 3]])
    assert torch.equal(out["chunks.0.ffn_router.head.weight"], sd["chunks.0.ffn_router.head.weight"][[1, 3, 4]])
    assert torch.equal(out["chunks.0.ffn_pool.fc_weight"], sd["chunks.0.ffn_pool.fc_weight"][[1, 3]])
    assert any("attn_router.top_k: 4 -> 3" in n for n in notes)
    assert any("2 of its SKIP classes removed" in n for n in notes)
    MoMModel(new).load_state_dict(out)


def test_pruned_model_fine_tunes(tmp_path):
    """mom-finetune (a real one-process launch) on a pruned model with a tokenizer."""
    from mom_dist.data.preprocess import preprocess
    from mom_dist.parallel.local_launch import rank_env
    from tests.evaluate import fixtures as fx

    src = fx.exported_model(tmp_path, n_attn_modules=4, n_ffn_modules=4)
    corpus = fx.write_jsonl(tmp_path / "corpus.jsonl", [{"text": r["sentence"]} for r in fx.classification_rows(60, 1)])
    preprocess([corpus], str(tmp_path / "d"), tokenizer_model=fx.tokenizer(tmp_path), workers=1, valid_ratio=0.5)
    assert mom_prune([src, "-o", str(tmp_path / "p"), "--attn-keep", "0.5", "--ffn-keep", "0.75", "--data",
                      str(tmp_path / "d_valid_text_document"), "--no-progress"]) == 0
    assert os.path.exists(tmp_path / "p" / "tokenizer.model")
    train = fx.write_jsonl(tmp_path / "train.jsonl", fx.classification_rows(16, seed=1))
    dev = fx.write_jsonl(tmp_path / "dev.jsonl", fx.classification_rows(8, seed=2))
    env = rank_env(0, 1, 0)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    cmd = [sys.executable, "-m", "mom_dist.cli.finetune", str(tmp_path / "p"), "--task", "sst2", "--train", train,
           "--eval", dev, "-o", str(tmp_path / "ft"), "--set", "train.steps=2", "--set", "train.seq_len=24",
           "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((tmp_path / "ft" / "eval_results.json").read_text())
    assert res["steps"] == 2 and res["n_eval"] == 8
    assert load_exported(str(tmp_path / "ft" / "model")).cfg.n_attn_modules == 2


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """A model with a tokenizer, data made with it, and data made with another tokenizer."""
    from tests.export.test_hf_export import two_tokenizer_data

    d = tmp_path_factory.mktemp("tok")
    tok, other = two_tokenizer_data(d, slice(45, 60), 400, 0.3)
    cfg = tiny_cfg(vocab_size=400, max_seq_len=32)
    src = save_exported(str(d / "src"), cfg, MoMModel(cfg).state_dict(), tokenizer=tok)
    bare = save_exported(str(d / "bare"), cfg, MoMModel(cfg).state_dict())
    vcfg = gpt2_config(16, 2, 3, vocab_size=400, max_seq_len=32)
    vanilla = save_exported(str(d / "vanilla"), vcfg, MoMModel(vcfg).state_dict(), tokenizer=tok)
    corrupt = save_exported(str(d / "corrupt"), cfg, MoMModel(cfg).state_dict(), tokenizer=tok)
    with open(os.path.join(corrupt, "model.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(corrupt, "model.safetensors")) // 2)
    (d / "used").mkdir()
    (d / "used" / "keep.txt").write_text("user data")
    g = torch.Generator().manual_seed(0)  # token data that records no tokenizer
    write_token_documents(str(d / "plain"), [torch.randint(2, 300, (60,), generator=g).tolist() + [1]], 400, eod=1)
    return dict(root=d, src=src, bare=bare, vanilla=vanilla, corrupt=corrupt, other_tok=other, plain=str(d / "plain"),
                data=str(d / "mine_valid_text_document"), other=str(d / "theirs_valid_text_document"))


# SOURCE, then options; {placeholders} are filled from the fixture. Every case also gets --no-progress.
OK = ["{src}", "-o", "{out}", "--data", "{data}", "--attn-keep", "0.5"]
ERRORS = {
    "keep_zero": (OK + ["--attn-keep", "0"], "--attn-keep 0.0 is not in (0, 1]"),
    "keep_above_one": (OK + ["--ffn-keep", "1.5"], "--ffn-keep 1.5 is not in (0, 1]"),
    "keep_negative": (OK + ["--attn-keep", "-0.5"], "is not in (0, 1]"),
    "keep_nan": (OK + ["--ffn-keep", "nan"], "--ffn-keep nan is not in (0, 1]"),
    "keeps_no_module": (OK + ["--attn-keep", "0.2"], "keeps floor(0.2 x 4) = 0 of the 4 attention modules"),
    "vanilla_source": (["{vanilla}"] + OK[1:], "has no routed modules"),
    "missing_source": (["{tmp}/nothing"] + OK[1:], "does not exist"),
    "corrupt_source": (["{corrupt}"] + OK[1:], "model.safetensors' is damaged"),
    "empty_source": (["{tmp}/empty"] + OK[1:], "no 'latest' file"),
    "existing_output": (OK + ["-o", "{used}"], "exists and is not empty"),
    "output_is_source": (OK + ["-o", "{src}", "--overwrite"], "is SOURCE itself"),
    "other_tokenizer": (OK + ["--data", "{other}"], "another tokenizer"),
    "missing_data": (OK + ["--data", "{tmp}/nodata"], ".bin/.idx"),
    "no_data_recorded": (["{src}", "-o", "{out}"], "records no data"),
    "tokenizer_option_not_the_datas": (["{bare}"] + OK[1:] + ["--tokenizer", "{other_tok}"], "another tokenizer"),
    "to_hf_no_tokenizer_recorded": (["{bare}", "-o", "{out}", "--data", "{plain}", "--to-hf", "{tmp}/hf"],
                                    "no tokenizer is recorded"),
    "same_outputs": (OK + ["--to-hf", "{out}"], "name the same directory"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_one_line_exit_2_nothing_written(tokenized, case, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    template, want = ERRORS[case]
    fill = dict(tokenized, tmp=str(tmp_path), out=str(tmp_path / "out"), used=str(tokenized["root"] / "used"))
    argv = [a.format(**fill) for a in template] + ["--no-progress"]
    before = snapshot(str(tokenized["root"]), str(tmp_path))
    code, out, err = prune(argv, capsys)
    assert code == 2 and out == "", out
    assert err.startswith("mom-prune: error: ") and err.count("\n") == 1 and want in err, err
    assert snapshot(str(tokenized["root"]), str(tmp_path)) == before  # nothing written, nothing lost


def test_the_error_cases_differ_from_a_good_call_only_in_what_they_name(tokenized, tmp_path, capsys):
    fill = dict(tokenized, out=str(tmp_path / "out"))
    code, out, err = prune([a.format(**fill) for a in OK] + ["--no-progress", "--max-batches", "1"], capsys)
    assert code == 0 and err == "", err
    assert json.loads((tmp_path / "out" / "prune_table.json").read_text())["n_attn_modules"] == [4, 2]


def test_cli_error_through_a_real_process(tokenized, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mom_dist.cli.prune", tokenized["vanilla"], "-o", str(tmp_path / "o"),
                           "--data", tokenized["data"]], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mom-prune: error: ") and not (tmp_path / "o").exists()
