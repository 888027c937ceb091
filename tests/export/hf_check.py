"""Runs an exported transformers directory the way a user without mom_dist would.

    python hf_check.py HF_DIR INPUTS.pt OUTPUTS.pt

Started by the export tests, in our venv with ``mom_dist`` made unimportable and in a clean
venv (torch + transformers + sentencepiece + safetensors only). Computes everything the tests
compare against mom_dist (logits, losses, generation, padding, classification, tokenizer ids, a
save_pretrained copy read back) and saves it; it asserts nothing itself.
"""

import os
import sys

sys.modules["mom_dist"] = None  # any ``import mom_dist`` now raises ImportError

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


def left_pad(seqs, pad):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], mask[i, n - len(s):] = torch.tensor(s), 1
    return ids, mask


def right_pad(seqs, pad):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


@torch.no_grad()
def main(hf_dir, inputs, outputs):
    x = torch.load(inputs)
    ids, prompt, n_new, seqs = x["ids"], x["prompt"], x["new_tokens"], x["ragged"]
    res = {"mom_dist_importable": "mom_dist" in sys.modules and sys.modules["mom_dist"] is not None}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    res["config"] = {k: getattr(model.config, k) for k in ("max_position_embeddings", "num_hidden_layers",
                                                           "bos_token_id", "eos_token_id", "pad_token_id")}
    res["generation_config"] = {k: getattr(model.generation_config, k) for k in ("bos_token_id", "eos_token_id",
                                                                                 "pad_token_id")}
    res["logits"] = model(ids).logits
    out = model(ids, labels=ids)
    res["losses"] = {k: float(getattr(out, k)) for k in ("loss", "lm_loss", "balance_loss", "z_loss")}
    res["position_logits"] = model(ids, position_ids=x["position_ids"]).logits

    model.generation_config.eos_token_id = None  # compare whole continuations (no early stop)
    mask = torch.ones_like(prompt)
    gen = dict(max_new_tokens=n_new, attention_mask=mask, pad_token_id=0)
    res["greedy"] = model.generate(prompt, do_sample=False, **gen)
    res["greedy_nocache"] = model.generate(prompt, do_sample=False, use_cache=False, **gen)
    res["beam"] = model.generate(prompt, do_sample=False, num_beams=3, **gen)
    res["beam_nocache"] = model.generate(prompt, do_sample=False, num_beams=3, use_cache=False, **gen)
    for name, cache in (("sample", True), ("sample_nocache", False)):
        torch.manual_seed(1)
        res[name] = model.generate(prompt, do_sample=True, top_k=20, use_cache=cache, **gen)

    lids, lmask = left_pad(seqs, 0)
    res["left_logits"] = model(lids, attention_mask=lmask).logits
    res["left_generate"] = model.generate(lids, attention_mask=lmask, do_sample=False, max_new_tokens=n_new,
                                          pad_token_id=0)
    rids, rmask = right_pad(seqs, 0)
    res["right_logits"] = model(rids, attention_mask=rmask).logits

    cls = AutoModelForSequenceClassification.from_pretrained(hf_dir, trust_remote_code=True, num_labels=3).eval()
    res["cls_right"] = cls(rids, attention_mask=rmask).logits
    res["cls_left"] = cls(lids, attention_mask=lmask).logits
    res["cls_rows"] = torch.cat([cls(torch.tensor([s])).logits for s in seqs])
    res["cls_loss"] = float(cls(rids, attention_mask=rmask, labels=torch.tensor([0, 1, 2][:len(seqs)])).loss)

    if x["texts"]:
        tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
        res["tok_ids"] = [tok(t)["input_ids"] for t in x["texts"]]
        res["tok_decoded"] = [tok.decode(tok(t)["input_ids"]) for t in x["texts"]]
        res["tok_special"] = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                          "unk_token_id", "model_max_length")}
        batch = tok(x["texts"][:2], padding=True, return_tensors="pt")
        res["tok_batch"] = (batch["input_ids"], batch["attention_mask"])
        # what Trainer checkpoints do: save_pretrained, then load the copy (remote code travels along)
        copy = os.path.join(os.path.dirname(os.path.abspath(outputs)), "resaved")
        model.save_pretrained(copy)
        tok.save_pretrained(copy)
        again = AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True).eval()
        res["resaved_logits"] = again(ids).logits
        res["resaved_tok_ids"] = [AutoTokenizer.from_pretrained(copy, trust_remote_code=True)(t)["input_ids"]
                                  for t in x["texts"]]
    torch.save(res, outputs)


if __name__ == "__main__":
    main(*sys.argv[1:4])
