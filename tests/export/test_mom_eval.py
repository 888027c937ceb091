"""``mom-eval``: every kind of model directory, the progress bar, lm-eval's rolling windows, the
tokenizer check training uses, and one test per error path (one line, exit 2, nothing changed)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mom_dist.cli.evaluate import main as mom_eval
from mom_dist.checkpoint.exported import save_exported
from mom_dist.convert.hf import export_hf
from mom_dist.data.loader import write_token_documents
from mom_dist.evaluate.perplexity import perplexity, read_tokens, rolling_windows
from mom_dist.model import MoMModel
from tests.dist_utils import ROOT
from tests.export.test_hf_export import routed_config, two_tokenizer_data


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, data made with it (mom-preprocess), data made with another tokenizer, and one
    model as an export directory (tokenizer recorded), a to-hf directory and a bare export."""
    d = tmp_path_factory.mktemp("eval")
    tok, other = two_tokenizer_data(d, slice(45, 75), 600, 0.2)
    torch.manual_seed(0)
    model = MoMModel(routed_config(400)).eval()
    export = save_exported(str(d / "export"), model.cfg, model.state_dict(), tokenizer=tok)
    bare = save_exported(str(d / "bare"), model.cfg, model.state_dict())
    hf = export_hf(model, str(d / "hf"), tokenizer=tok)
    return dict(tok=tok, model=model, export=export, bare=bare, hf=hf, data=str(d / "mine_valid_text_document"),
                other=str(d / "theirs_valid_text_document"), other_tok=other, root=d)


def run_cli(args, capsys):
    code = mom_eval(args)
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(*paths):
    h = {}
    for p in paths:
        for root, _, files in os.walk(p) if os.path.isdir(p) else [(os.path.dirname(p), [], [os.path.basename(p)])]:
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    h[os.path.join(root, f)] = hashlib.sha256(fh.read()).hexdigest()
    return h


def test_export_and_hf_directories_give_the_same_perplexity_with_progress(world, capsys):
    args = ["--data", world["data"], "--seq-len", "16", "--batch-size", "4", "--max-batches", "3"]
    code, out_export, err = run_cli([world["export"], *args], capsys)
    assert code == 0, err
    assert "mom-eval" in err and "batch" in err  # the tqdm bar, on stderr
    code, out_hf, err = run_cli([world["hf"], *args, "--no-progress"], capsys)
    assert code == 0 and err == "", err
    a, b = json.loads(out_export), json.loads(out_hf)
    assert a == b and a["tokens"] == 3 * 4 * 16 < len(read_tokens(world["data"]))
    assert 1 < a["perplexity"] < 400 * 4


def test_run_directory_tokenizer_found_from_its_data(world, tmp_path):
    from mom_dist.convert.model_tokenizer import run_tokenizer_search

    def run_tokenizer(state):
        return run_tokenizer_search(state).path

    prefix = world["data"].replace("_valid_", "_train_")
    assert os.path.samefile(run_tokenizer({"config": {"data": {"train_prefixes": [prefix]}}}), world["tok"])
    assert os.path.samefile(run_tokenizer({"config": {"data": {"train_prefixes": prefix}}}), world["tok"])
    assert os.path.samefile(run_tokenizer({"config": {"data": {"tokenizer_model": world["tok"]}}}), world["tok"])
    assert run_tokenizer({"config": {"data": {"synthetic": {"seed": 1}}}}) is None


def test_stride_windows_are_lm_evals(world, tmp_path):
    from lm_eval.utils import get_rolling_token_windows

    for n, L, S in [(50, 16, 16), (50, 16, 5), (50, 16, 1), (10, 16, 4), (16, 16, 3), (33, 8, 8)]:
        toks = list(range(100, 100 + n))
        ext = [1] + toks
        ours = [(ext[s:s + m], ext[s + 1:s + m + 1][m - k:]) for s, m, k in rolling_windows(n, L, S)]
        theirs = [(list(i), list(t)) for i, t in get_rolling_token_windows(toks, 1, L, L - S + 1)]
        assert ours == theirs, (n, L, S)
    # and the loss is the mean NLL over lm-eval's windows, scored by our model
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, 400, (n,), generator=g).tolist() + [1] for n in (30, 17, 12)]
    write_token_documents(str(tmp_path / "small"), docs, 400, eod=1)
    model, tokens, L = world["model"], sum(docs, []), 16
    for S in (16, 6):
        total = 0.0
        with torch.no_grad():
            for inp, tgt in get_rolling_token_windows(tokens, 1, L, L - S + 1):
                logp = F.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)
                total -= logp[-len(tgt):].gather(-1, torch.tensor(tgt)[:, None]).sum().item()
        res = perplexity(model, str(tmp_path / "small"), seq_len=L, stride=S, batch_size=3, eod=1)
        assert res["tokens"] == len(tokens) and res["stride"] == S
        assert res["loss"] == pytest.approx(total / len(tokens), rel=1e-5)


def test_compile_gives_the_eager_perplexity(world, capsys, monkeypatch):
    """--compile on (auto is off on CPU): the model runs through torch.compile, the log line gives
    Dynamo's counters. Compiled with aot_eager instead of inductor (the same graphs, without
    generating kernels: minutes on this CPU); inductor itself: tests/model/test_compile.py."""
    import mom_dist.model.compile as mc

    real = mc.compile_model
    monkeypatch.setattr(mc, "compile_model", lambda model, backend="inductor": real(model, "aot_eager"))
    mc.reset_compiler()
    args = ["--data", world["data"], "--seq-len", "16", "--stride", "8", "--batch-size", "3", "--max-batches", "3",
            "--no-progress"]
    code, eager, err = run_cli([world["export"], *args], capsys)
    assert code == 0 and err == ""  # auto: off on CPU
    code, compiled, err = run_cli([world["export"], *args, "--compile", "on"], capsys)
    assert code == 0, err
    a, b = json.loads(eager), json.loads(compiled)
    assert a["tokens"] == b["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert err == "mom-eval: torch.compile: 1 graph(s), 0 graph break(s), 0 recompile(s)\n"


def test_cli_exit_code_through_a_real_process(world, tmp_path):
    out = subprocess.run([sys.executable, "-m", "mom_dist.cli.evaluate", world["export"], "--data", world["other"],
                          "--seq-len", "16"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("mom-eval: error: ")
    assert "another tokenizer" in out.stderr


@pytest.mark.parametrize("case", ["other_tokenizer", "other_tokenizer_given", "other_tokenizer_given_hf",
                                  "model_without_tokenizer", "missing_data", "missing_source",
                                  "not_a_model", "seq_len_too_long", "bad_stride", "too_few_tokens",
                                  "ids_beyond_vocab", "missing_tokenizer_file", "corrupt_tokenizer"])
def test_error_paths(world, case, capsys, tmp_path):
    short = str(tmp_path / "short")
    write_token_documents(short, [[5, 6, 7, 1]], 400, eod=1)
    big = str(tmp_path / "big")
    write_token_documents(big, [[5, 999, 7, 1] * 10], 1000, eod=1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.model").write_bytes(b"garbage")
    base = ["--seq-len", "16", "--no-progress"]
    args, want = {
        "other_tokenizer": ([world["export"], "--data", world["other"]],
                            "another tokenizer than the model's (" + world["export"]),
        # --tokenizer cannot replace the model's own (the perplexity would be meaningless)
        "other_tokenizer_given": ([world["export"], "--data", world["other"], "--tokenizer", world["other_tok"]],
                                  f"--tokenizer {world['other_tok']} is not the tokenizer '{world['export']}' was "
                                  "trained with"),
        "other_tokenizer_given_hf": ([world["hf"], "--data", world["data"], "--tokenizer", world["other_tok"]],
                                     "their vocabularies differ"),
        "model_without_tokenizer": ([world["bare"], "--data", world["data"]], "pass --tokenizer"),
        "missing_data": ([world["export"], "--data", str(tmp_path / "nope")], "no " + str(tmp_path / "nope") + ".bin"),
        "missing_source": ([str(tmp_path / "nothing"), "--data", world["data"]], "does not exist"),
        "not_a_model": ([str(tmp_path / "empty"), "--data", world["data"]], "no 'latest' file"),
        "seq_len_too_long": ([world["export"], "--data", world["data"], "--seq-len", "4096"], "exceeds the model's"),
        "bad_stride": ([world["export"], "--data", world["data"], "--stride", "17"], "--stride 17 must be"),
        "too_few_tokens": ([world["bare"], "--data", short], "fewer than one window"),
        "ids_beyond_vocab": ([world["bare"], "--data", big], "holds token id 999"),
        "missing_tokenizer_file": ([world["bare"], "--data", world["data"], "--tokenizer", "x.model"], "no such file"),
        "corrupt_tokenizer": ([world["bare"], "--data", world["data"], "--tokenizer", str(tmp_path / "bad.model")],
                              "is not a readable SentencePiece model"),
    }[case]
    before = snapshot(world["root"], str(tmp_path))
    code, out, err = run_cli(base + args, capsys)
    assert code == 2 and out == ""
    assert err.startswith("mom-eval: error: ") and err.count("\n") == 1 and want in err, err
    if case.startswith("other_tokenizer"):  # the fix offered is to the data, never to the model
        assert "re-tokenize the data with the model's tokenizer" in err, err
    assert snapshot(world["root"], str(tmp_path)) == before  # nothing written, nothing lost


def test_the_models_own_tokenizer_under_another_name_is_accepted(world, tmp_path, capsys):
    import shutil

    copy = shutil.copy(world["tok"], tmp_path / "renamed.model")  # same vocabulary, another file
    args = ["--data", world["data"], "--seq-len", "16", "--max-batches", "2", "--no-progress"]
    code, plain, err = run_cli([world["export"], *args], capsys)
    assert code == 0, err
    code, renamed, err = run_cli([world["export"], *args, "--tokenizer", str(copy)], capsys)
    assert code == 0 and json.loads(renamed) == json.loads(plain), err


def test_to_hf_tokenizer_errors(world, tmp_path, capsys):
    from mom_dist.cli.convert import main as mom_convert

    def convert(*args):
        code = mom_convert(["to-hf", *args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    out = convert(world["bare"], "-o", str(tmp_path / "x"))
    assert out.returncode == 2 and out.stderr.startswith("mom-convert: error: no tokenizer is recorded")
    assert not (tmp_path / "x").exists()
    out = convert(world["bare"], "-o", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "none.model"))
    assert out.returncode == 2 and "no such file" in out.stderr and not (tmp_path / "x").exists()
    (tmp_path / "garbage.model").write_bytes(b"not a sentencepiece model")
    out = convert(world["bare"], "-o", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "garbage.model"))
    assert out.returncode == 2 and "is not a readable SentencePiece model" in out.stderr and not (tmp_path / "x").exists()
    small = save_exported(str(tmp_path / "small"), routed_config(64), MoMModel(routed_config(64)).state_dict())
    out = convert(small, "-o", str(tmp_path / "x"), "--tokenizer", world["tok"])
    assert out.returncode == 2 and "has 400 ids but the model's vocab_size is 64" in out.stderr, out.stderr
    assert not (tmp_path / "x").exists()
    out = convert(world["bare"], "-o", str(tmp_path / "x"), "--tokenizer", world["tok"])
    assert out.returncode == 0 and (tmp_path / "x" / "tokenizer.model").exists(), out.stderr
    out = convert(world["bare"], "-o", str(tmp_path / "y"), "--no-tokenizer")
    assert out.returncode == 0 and not (tmp_path / "y" / "tokenizer.model").exists()
    out = convert(world["export"], "-o", str(tmp_path / "z"), "--tokenizer", world["other_tok"])
    assert out.returncode == 2 and "their vocabularies differ" in out.stderr and not (tmp_path / "z").exists()
