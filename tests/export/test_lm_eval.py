"""lm-evaluation-harness on a ``mom-convert to-hf`` directory, exactly as a user runs it:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path TASKS ...

on three local tasks this test writes (loglikelihood, loglikelihood_rolling, generate_until; a
JSON dataset, no network). Each logged answer is recomputed with our ``MoMModel``: the
log-likelihoods (lm-eval batches and right-pads them), the rolling log-likelihood (lm-eval's
windows), and the greedy continuations (lm-eval left-pads prompts of different lengths).
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mom_dist.convert.hf import export_hf
from mom_dist.model import MoMModel
from mom_dist.model.generate import generate_greedy
from tests.export.test_hf_export import routed_config, tiny_tokenizer

DOCS = [{"context": "The cat sat on the", "target": " mat", "question": "Say hi:", "text": "Hello world. " * 20},
        {"context": "Numbers: 1 2 3", "target": " 4 5", "question": "A much longer question, with more words:",
         "text": "The quick brown fox jumps over the lazy dog.\nA second line."},
        {"context": "x", "target": "y", "question": "Q", "text": "short"}]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
"""
TASKS = {
    "mom_ll": 'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\nmetric_list:\n  - metric: acc\n',
    "mom_roll": 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n',
    "mom_gen": ('doc_to_text: "{{question}}"\ndoc_to_target: " hi"\ngeneration_kwargs:\n  until: ["\\n"]\n'
                '  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n'),
}
KINDS = {"mom_ll": "loglikelihood", "mom_roll": "loglikelihood_rolling", "mom_gen": "generate_until"}


def logprob(model, ids: list[int], n_scored: int) -> float:
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    tgt = torch.tensor(ids[1:])[-n_scored:]
    return logp[-n_scored:].gather(-1, tgt[:, None]).sum().item()


def test_lm_eval_harness_runs_all_request_kinds_on_the_export(tmp_path):
    lm_eval_bin = shutil.which("lm_eval") or os.path.join(os.path.dirname(sys.executable), "lm_eval")
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install -e .[eval])")
    from lm_eval.utils import get_rolling_token_windows

    from mom_dist.data.tokenizer import Tokenizer

    tok_path = tiny_tokenizer(str(tmp_path))
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    model = MoMModel(routed_config(400)).eval()
    hf_dir = export_hf(model, str(tmp_path / "hf"), tokenizer=tok_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    with open(tasks / "data.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in DOCS)
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=tasks / "data.jsonl", kind=KINDS[name]) + body)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the export needs no mom_dist
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([lm_eval_bin, "--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True",
                           "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--device", "cpu",
                           "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def samples(task):
        (path,) = glob.glob(str(tmp_path / "out" / "*" / f"samples_{task}_*.jsonl"))
        with open(path) as f:
            return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])

    for s in samples("mom_ll"):  # log P(target | context), lm-eval's context/continuation split
        doc = DOCS[s["doc_id"]]
        ctx = tok.encode(doc["context"])
        whole = tok.encode(doc["context"] + doc["target"])
        got = float(s["resps"][0][0][0])
        assert got == pytest.approx(logprob(model, whole, len(whole) - len(ctx)), abs=1e-4)
    for s in samples("mom_roll"):  # sum over lm-eval's rolling windows (max_length from the config)
        ids = tok.encode(DOCS[s["doc_id"]]["text"])
        assert s["doc_id"] != 0 or len(ids) > 2 * model.cfg.max_seq_len  # several windows
        want = sum(logprob(model, list(inp) + [tgt[-1]], len(tgt))
                   for inp, tgt in get_rolling_token_windows(ids, tok.eod, model.cfg.max_seq_len, 1))
        assert float(s["resps"][0][0]) == pytest.approx(want, abs=1e-3)
    for s in samples("mom_gen"):  # greedy continuation, cut at the end-of-document id and at "\n"
        prompt = tok.encode(DOCS[s["doc_id"]]["question"])
        new = generate_greedy(model, torch.tensor([prompt]), 6)[0, len(prompt):].tolist()
        new = new[:new.index(tok.eod)] if tok.eod in new else new
        assert s["resps"][0][0] == tok.decode(new).split("\n")[0]
