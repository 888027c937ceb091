"""transformers directories: a ``MoMModel`` written as one, and read back.

``export_hf`` writes a self-contained transformers directory (needs torch + transformers only):
the vanilla special case as a stock ``GPT2LMHeadModel``; a routed MoM as ``MoMForCausalLM`` /
``MoMForSequenceClassification``, whose code travels in the directory (``trust_remote_code``).
Both get the tokenizer (``AutoTokenizer``, remote code ``tokenization_mom.py``),
``generation_config.json`` with our end-of-document id, and the maximum length.
``read_hf_dir`` reads such a directory (or a Hugging Face GPT-2) back as a model config and a
plain state dict; ``mom_dist.checkpoint.sources.load_source`` uses it. The tokenizer checks
and the output-directory check here are shared with our exported directories
(``mom_dist.checkpoint.exported``). A fine-tuned classifier's head (``convert/task_head.py``)
goes with the model: ``MoMForSequenceClassification`` / ``GPT2ForSequenceClassification``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import torch

from mom_dist.config_utils import from_dict
from mom_dist.convert.gpt2 import hf_from_layers, layers_from_hf, layers_from_mom, mom_from_layers
from mom_dist.convert.model_tokenizer import TOKENIZER_FILE
from mom_dist.convert.task_head import TaskHead
from mom_dist.model import MoMModel
from mom_dist.model.config import ModelConfig, gpt2_config

HF_REMOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")


def refuse_existing(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"'{out_dir}' exists and is not empty; choose another output or pass --overwrite")


def read_safetensors_dir(path: str) -> dict:
    """Every ``model*.safetensors`` of a directory, as one state dict."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "model*.safetensors")))
    if not files:
        raise ValueError(f"'{path}' holds no model*.safetensors")
    sd = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except Exception as e:  # safetensors' SafetensorError: truncated, a damaged header
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"'{f}' is damaged (safetensors cannot read it: {why}); write the directory again "
                             "from its source") from None
    return sd


def is_hf_dir(path: str) -> bool:
    """A transformers directory (config.json with a model_type; a run's config.json has none)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def read_hf_dir(path: str) -> tuple[ModelConfig, dict]:
    """(model config, plain state dict) of a transformers directory written by ``export_hf``, or
    of a Hugging Face GPT-2 (as a vanilla MoM; its routers are not in the state dict)."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    kind = hf.get("model_type")
    if kind == "mom":
        cfg = from_dict(ModelConfig, _known_fields(hf["mom"]), "model.")
        cfg.validate()
        sd = {k[len("model."):]: v for k, v in read_safetensors_dir(path).items() if k.startswith("model.")}
        return cfg, sd
    if kind == "gpt2":
        embed, layers = layers_from_hf(read_safetensors_dir(path))
        cfg = gpt2_config(hf["n_embd"], hf["n_head"], len(layers), vocab_size=hf["vocab_size"],
                          max_seq_len=hf["n_positions"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))
        return cfg, mom_from_layers(embed, layers, cfg)
    raise ValueError(f"'{path}/config.json' has model_type {kind!r}; mom_dist reads its own to-hf directories "
                     "(model_type 'mom' or 'gpt2')")


def _known_fields(mom: dict) -> dict:
    """The transformers config fills every field the standalone code knows; drop the ones this
    ModelConfig lacks while they hold their default (else the model needs them: refuse)."""
    from mom_dist.convert.hf_remote.configuration_mom import MOM_DEFAULTS

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    extra = {k: v for k, v in mom.items() if k not in known and v != MOM_DEFAULTS.get(k, object())}
    if extra:
        raise ValueError(f"this model uses options {sorted(extra)} that this mom_dist lacks; update mom_dist")
    return {k: v for k, v in mom.items() if k in known}


def is_vanilla(cfg: ModelConfig) -> bool:
    """The spec §7 GPT-2 special case: every step runs module h, K=1, no SKIP."""
    return cfg.n_attn_modules == cfg.n_ffn_modules == cfg.n_steps and all(
        r.schedule == "diagonal" and r.top_k == 1 and not r.allow_skip for r in (cfg.attn_router, cfg.ffn_router))


def special_ids(tokenizer: str | None) -> dict:
    """bos/eos (= the end-of-document id) and pad (= unk: byte fallback never produces it)."""
    if tokenizer is None:
        return {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0}  # our tokenizers' layout
    from mom_dist.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    unk = tok._sp.unk_id()
    return {"bos_token_id": tok.eod, "eos_token_id": tok.eod, "pad_token_id": unk if unk >= 0 else tok.eod}


def check_tokenizer(tokenizer: str, vocab_size: int):
    """The tokenizer, if it can be this model's (checked before anything is written)."""
    from mom_dist.data.tokenizer import Tokenizer

    try:
        tok = Tokenizer(tokenizer)
    except (RuntimeError, OSError) as err:
        raise ValueError(f"tokenizer {tokenizer} is not a SentencePiece model ({err}); pass the .model its data "
                         "was made with") from None
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tokenizer} has {tok.vocab_size} ids but the model's vocab_size is {vocab_size}: "
                         "it is not the tokenizer this model was trained with; pass the right --tokenizer")
    return tok


def write_tokenizer(out_dir: str, tokenizer: str, max_len: int, vocab_size: int) -> None:
    """tokenizer.model + tokenizer_config.json for ``AutoTokenizer`` (remote code tokenization_mom.py)."""
    from mom_dist.data.tokenizer import Tokenizer

    tok = check_tokenizer(tokenizer, vocab_size)
    ids = special_ids(tokenizer)
    piece = tok._sp.id_to_piece
    shutil.copyfile(tokenizer, os.path.join(out_dir, TOKENIZER_FILE))
    shutil.copy(os.path.join(HF_REMOTE, "tokenization_mom.py"), out_dir)
    conf = {"tokenizer_class": "MoMTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_mom.MoMTokenizer", None]},
            "unk_token": piece(ids["pad_token_id"]), "pad_token": piece(ids["pad_token_id"]),
            "bos_token": piece(ids["bos_token_id"]), "eos_token": piece(ids["eos_token_id"]),
            "model_max_length": max_len, "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "add_eos_token": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(conf, f, indent=1)


def _write_generation_config(out_dir: str, ids: dict) -> None:
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(ids, f, indent=1)


def export_hf(model: MoMModel, out_dir: str, *, overwrite: bool = False, tokenizer: str | None = None,
              head: TaskHead | None = None) -> str:
    """A transformers directory: GPT2LMHeadModel for the vanilla case, else MoMForCausalLM; with a
    fine-tuned ``head``, GPT2ForSequenceClassification / MoMForSequenceClassification."""
    if is_vanilla(model.cfg):
        return export_hf_gpt2(model, out_dir, overwrite=overwrite, tokenizer=tokenizer, head=head)
    return export_hf_mom(model, out_dir, overwrite=overwrite, tokenizer=tokenizer, head=head)


def _check_head(head: TaskHead | None, d_model: int) -> dict:
    if head is None:
        return {}
    if head.weight.shape[1] != d_model:
        raise ValueError(f"the task head's score.weight has shape {tuple(head.weight.shape)}, not (labels, "
                         f"{d_model}): it belongs to another model")
    return head.hf_config()


def export_hf_mom(model: MoMModel, out_dir: str, *, overwrite: bool = False, tokenizer: str | None = None,
                  head: TaskHead | None = None) -> str:
    """A routed MoM with its code (``trust_remote_code``): ``MoMForCausalLM`` weights under ``model.``
    (plus ``score.weight`` for ``MoMForSequenceClassification`` when a task head is given)."""
    from safetensors.torch import save_file

    from mom_dist.convert.hf_remote.configuration_mom import MoMConfig

    refuse_existing(out_dir, overwrite)
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.cfg.vocab_size)
    head_cfg = _check_head(head, model.cfg.d_model)
    os.makedirs(out_dir, exist_ok=True)
    ids = special_ids(tokenizer)
    arch = "MoMForSequenceClassification" if head else "MoMForCausalLM"
    hf_cfg = MoMConfig(mom=dataclasses.asdict(model.cfg), architectures=[arch], auto_map={
        "AutoConfig": "configuration_mom.MoMConfig", "AutoModel": "modeling_mom.MoMModel",
        "AutoModelForCausalLM": "modeling_mom.MoMForCausalLM",
        "AutoModelForSequenceClassification": "modeling_mom.MoMForSequenceClassification"}, **ids, **head_cfg)
    hf_cfg.save_pretrained(out_dir)
    sd = {f"model.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if head is not None:
        sd["score.weight"] = head.weight.detach().float().contiguous()
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in ("configuration_mom.py", "modeling_mom.py"):
        shutil.copy(os.path.join(HF_REMOTE, name), out_dir)
    _write_generation_config(out_dir, ids)
    if tokenizer is not None:
        write_tokenizer(out_dir, tokenizer, model.cfg.max_seq_len, model.cfg.vocab_size)
    return out_dir


def export_hf_gpt2(model: MoMModel, out_dir: str, *, overwrite: bool = False, tokenizer: str | None = None,
                   head: TaskHead | None = None) -> str:
    """Write a vanilla-schedule MoM (spec §7: the GPT-2 special case) as a GPT2LMHeadModel (with a
    task head: a GPT2ForSequenceClassification)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    cfg = model.cfg
    if not is_vanilla(cfg):
        raise ValueError("only the vanilla special case (diagonal schedule, top_k=1, no SKIP) is a GPT-2; "
                         "export a routed MoM with export_hf (MoMForCausalLM, trust_remote_code)")
    refuse_existing(out_dir, overwrite)
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg.vocab_size)
    head_cfg = _check_head(head, cfg.d_model)
    embed, layers = layers_from_mom(model.state_dict(), cfg)
    ids = special_ids(tokenizer)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                        n_layer=len(layers), n_head=cfg.n_heads, activation_function="gelu_new",
                        layer_norm_epsilon=cfg.layer_norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                        attn_pdrop=cfg.dropout, tie_word_embeddings=True, **ids, **head_cfg)
    sd = hf_from_layers(embed, layers)
    if head is None:
        hf = GPT2LMHeadModel(hf_cfg)
    else:  # GPT-2's own classifier: the body under transformer., score.weight, no LM head
        hf = GPT2ForSequenceClassification(hf_cfg)
        sd = {**{k: v for k, v in sd.items() if k != "lm_head.weight"}, "score.weight": head.weight.float()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), missing
    hf.save_pretrained(out_dir)
    _write_generation_config(out_dir, ids)
    if tokenizer is not None:
        write_tokenizer(out_dir, tokenizer, cfg.max_seq_len, cfg.vocab_size)
    return out_dir
