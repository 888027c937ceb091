"""A Mixture-of-Modules language model for transformers, written by ``mom-convert to-hf``.

Needs only torch and transformers (``trust_remote_code=True``); it is an independent
re-implementation of mom_dist's forward (tests hold it to mom_dist's logits within 1e-5):

    embeddings -> bottom blocks -> per chunk: H routing steps (+ anchor) -> top blocks -> LN -> tied head

A routing step: the attention router picks top-K of the attention modules (+ SKIP); the picked
modules' QKV are summed (weighted when ``qkv_weighted``), attention runs on the mixed Q/K/V, the
picked modules' output projections are mixed by the router weights; then the FFN router picks
FFN modules the same way. GRU routers carry a per-token state across a chunk's steps.

Dispatch here is a plain loop over modules (gather the tokens that picked module i, compute,
scatter-add), in module order, as mom_dist's combine sums them. Every attention that runs -
each bottom/anchor/top block and each routing step of each chunk - has its own KV cache layer
(a step's keys come from that step's picks), so ``config.num_hidden_layers`` counts them and
``generate()`` gets a transformers ``DynamicCache`` with one layer each; beam search reorders it.

Padding: ``attention_mask`` (1 token, 0 padding; covering cached + new tokens) hides padded
keys; positions come from it (or from ``position_ids``), so left padding gives the logits of the
unpadded sequence. With ``labels`` the loss is the LM loss plus ``balance_coef`` x balance loss
plus ``z_loss_coef`` x router z-loss (as Mixtral adds its aux loss), so ``Trainer`` keeps them;
padded tokens are left out of the router losses. Shape suffixes: B batch, S new tokens, L keys,
T tokens (B*S), D width, K picks, C router classes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.utils import ModelOutput

from .configuration_mom import MoMConfig


def gelu(x):
    return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new"


class Linear(nn.Module):
    """y = x @ weight + bias, weight stored (in, out) like GPT-2's Conv1D (mom_dist's layout)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x, self.weight.t(), self.bias)


class Attention(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.ln = nn.LayerNorm(d, eps=eps)
        self.qkv = Linear(d, 3 * d)
        self.proj = Linear(d, d)


class FeedForward(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.ln = nn.LayerNorm(d, eps=eps)
        self.fc = Linear(d, 4 * d)
        self.proj = Linear(4 * d, d)

    def forward(self, x):
        return self.proj(gelu(self.fc(self.ln(x))))


class Block(nn.Module):
    """An ordinary pre-LN GPT-2 block (bottom, anchor, top)."""

    def __init__(self, d, eps):
        super().__init__()
        self.attn = Attention(d, eps)
        self.ffn = FeedForward(d, eps)

    def forward(self, x_BSD, ctx, layer_idx):
        q, k, v = self.attn.qkv(self.attn.ln(x_BSD)).split(x_BSD.shape[-1], dim=-1)
        x_BSD = x_BSD + ctx.dropout(self.attn.proj(ctx.attend(q, k, v, layer_idx, None)))
        return x_BSD + ctx.dropout(self.ffn(x_BSD))


class Pool(nn.Module):
    """N modules of one kind, weights stacked module-first (mom_dist's pool layout)."""

    def __init__(self, n, d, shapes):
        super().__init__()
        self.ln_weight = nn.Parameter(torch.ones(n, d))
        self.ln_bias = nn.Parameter(torch.zeros(n, d))
        for name, (d_in, d_out) in shapes.items():
            setattr(self, f"{name}_weight", nn.Parameter(torch.empty(n, d_in, d_out)))
            setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(n, d_out)))
        self.n = n

    def lin(self, name, i, x):
        return x @ getattr(self, f"{name}_weight")[i] + getattr(self, f"{name}_bias")[i]

    def affine(self, i, xhat):
        """Module i's LayerNorm affine on rows normalised once before dispatch."""
        return xhat * self.ln_weight[i] + self.ln_bias[i]

    def mix(self, fn, x_TI, ids_TK, weights_TK, d_out):
        """sum over a token's picked modules i of weight * fn(i, x) (SKIP picks add nothing)."""
        out = x_TI.new_zeros(x_TI.shape[0], d_out)
        for i in range(self.n):
            hit_TK = ids_TK == i
            rows = hit_TK.any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            y = fn(i, x_TI.index_select(0, rows))
            if weights_TK is not None:
                y = y * (weights_TK * hit_TK).sum(-1).index_select(0, rows).unsqueeze(-1).to(y.dtype)
            out.index_add_(0, rows, y)
        return out


class Router(nn.Module):
    """GRU (state across a chunk's steps) or MLP router over C = max(N_A, N_F) + 1 classes."""

    def __init__(self, rc, d, n_classes, n_modules, bias):
        super().__init__()
        self.rc, self.n_classes, self.n_modules = rc, n_classes, n_modules
        if rc["kind"] == "gru":
            self.cell = nn.GRUCell(d, rc["dim"])
            self.head = nn.Linear(rc["dim"], n_classes, bias=False)
            self.head_bias = nn.Parameter(torch.zeros(n_classes)) if bias else None
        else:
            self.hidden = nn.Linear(d, rc["dim"])
            self.head = nn.Linear(rc["dim"], n_classes)

    def forward(self, x_TD, state, step):
        rc, dtype = self.rc, self.head.weight.dtype
        with torch.autocast(x_TD.device.type, enabled=False):  # picks must not depend on autocast
            if rc["kind"] == "gru":
                state = self.cell(x_TD.to(dtype), state if state is not None else
                                  x_TD.new_zeros(x_TD.shape[0], rc["dim"], dtype=dtype))
                scores = self.head(state)
                if self.head_bias is not None:
                    scores = scores + self.head_bias
            else:
                scores = self.head(F.relu(self.hidden(x_TD.to(dtype))))
        c = torch.arange(self.n_classes, device=x_TD.device)
        skip = c >= self.n_modules
        module_ok = ~skip if rc["schedule"] == "free" else c == step % self.n_modules
        allowed = module_ok | (skip & rc["allow_skip"])
        logits_TC = (scores.float() / rc["temperature"]).masked_fill(~allowed, float("-inf"))
        probs_TC = logits_TC.softmax(-1)
        top_p, ids_TK = probs_TC.topk(rc["top_k"], dim=-1)
        return logits_TC, probs_TC, ids_TK, self._weights(top_p), state

    def _weights(self, top_p):
        kind = self.rc["weighting"]
        if kind == "raw":
            return top_p
        renorm = torch.ones_like(top_p) if top_p.shape[-1] == 1 else top_p / top_p.sum(-1, keepdim=True)
        if kind == "renorm":
            return renorm
        return renorm.detach() + top_p - top_p.detach()  # straight-through: renorm value, raw gradient


class Chunk(nn.Module):
    def __init__(self, m, index):
        super().__init__()
        d, n_classes = m["d_model"], max(m["n_attn_modules"], m["n_ffn_modules"]) + 1
        self.m, self.index = m, index
        self.attn_pool = Pool(m["n_attn_modules"], d, {"qkv": (d, 3 * d), "proj": (d, d)})
        self.ffn_pool = Pool(m["n_ffn_modules"], d, {"fc": (d, 4 * d), "proj": (4 * d, d)})
        self.attn_router = Router(m["attn_router"], d, n_classes, m["n_attn_modules"], m["router_bias"])
        self.ffn_router = Router(m["ffn_router"], d, n_classes, m["n_ffn_modules"], m["router_bias"])

    def forward(self, x_BSD, ctx, first_layer):
        m = self.m
        B, S, D = x_BSD.shape
        eps = m["layer_norm_eps"]
        ap, fp = self.attn_pool, self.ffn_pool
        x = x_BSD.reshape(B * S, D)
        state_a = state_f = None
        records = []
        for step in range(m["n_steps"]):
            la, pa, ids, w, state_a = self.attn_router(x, state_a, step)
            xhat = F.layer_norm(x, (D,), eps=eps)
            qkv = ap.mix(lambda i, r: ap.lin("qkv", i, ap.affine(i, r)), xhat, ids,
                         w if m["qkv_weighted"] else None, 3 * D)
            q, k, v = qkv.view(B, S, 3 * D).split(D, dim=-1)
            # An all-SKIP token has q = k = v = 0; mask_skip_keys hides its key from later tokens.
            keep = (ids < ap.n).any(-1).view(B, S) if m["mask_skip_keys"] else None
            att = ctx.attend(q, k, v, first_layer + step, keep).reshape(B * S, D)
            x = x + ctx.dropout(ap.mix(lambda i, r: ap.lin("proj", i, r), att, ids, w, D))
            lf, pf, fids, fw, state_f = self.ffn_router(x, state_f, step)
            xhat = F.layer_norm(x, (D,), eps=eps)
            x = x + ctx.dropout(fp.mix(lambda i, r: fp.lin("proj", i, gelu(fp.lin("fc", i, fp.affine(i, r)))),
                                       xhat, fids, fw, D))
            records += [(self.index, step, "attn", la, pa, ids[:, 0]), (self.index, step, "ffn", lf, pf, fids[:, 0])]
        return x.view(B, S, D), records


class AttentionContext:
    """What every attention of one forward shares: heads, the key-padding mask, the KV cache,
    dropout (the model's ``dropout`` in training mode, where mom_dist applies it)."""

    def __init__(self, n_heads, cache, key_pad_BL, p):
        self.n_heads, self.cache, self.key_pad_BL, self.p = n_heads, cache, key_pad_BL, p

    def dropout(self, x):
        return F.dropout(x, self.p, True) if self.p > 0 else x

    def attend(self, q_BSD, k_BSD, v_BSD, layer_idx, keep_BS):
        B, S, D = q_BSD.shape
        H = self.n_heads
        heads = lambda t: t.view(B, t.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q_BSD), heads(k_BSD), heads(v_BSD)
        if keep_BS is not None:  # the keep flag travels with the values (one extra channel)
            v = torch.cat([v, keep_BS[:, None, :, None].to(v.dtype).expand(B, H, S, 1)], -1)
        if self.cache is not None:
            k, v = self.cache.update(k, v, layer_idx)
        keep_BL = None
        if keep_BS is not None:
            keep_BL, v = v[:, 0, :, -1] > 0.5, v[..., :-1]
        L = k.shape[2]
        allow = torch.ones(S, L, dtype=torch.bool, device=q.device).tril(diagonal=L - S)[None].expand(B, S, L)
        if self.key_pad_BL is not None:
            allow = allow & self.key_pad_BL[:, None, :]
        if keep_BL is not None:
            allow = allow & keep_BL[:, None, :]
        # A query always sees its own key: a padding or all-SKIP query would otherwise be all -inf (NaN).
        own = torch.zeros(S, L, dtype=torch.bool, device=q.device)
        own[torch.arange(S, device=q.device), torch.arange(L - S, L, device=q.device)] = True
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=(allow | own)[:, None], dropout_p=self.p)
        return out.transpose(1, 2).reshape(B, S, D)


def balance_term(probs_TC, top1_T, valid_T, double_softmax):
    """Switch-style balance C * sum_i f_i P_i over valid tokens (mom_dist's balance_loss)."""
    C = probs_TC.shape[-1]
    p = probs_TC.softmax(-1) if double_softmax else probs_TC
    w = valid_T.to(p.dtype)
    n = w.sum().clamp(min=1.0)
    f = ((top1_T.unsqueeze(-1) == torch.arange(C, device=top1_T.device)).to(p.dtype) * w[:, None]).sum(0) / n
    return C * (f * (p * w[:, None]).sum(0) / n).sum()


def router_losses(m, records, valid_T):
    """(balance, z) as mom_dist computes them: z averaged over routers (chunk x {attn, ffn});
    balance by ``balance_reduction``: mean over routers, or the release's attn + FFN sum with
    each pool's steps of all chunks together. ``valid_T`` leaves padding tokens out."""
    def bal(recs):
        if m["balance_mode"] == "depthwise":
            return torch.stack([balance_term(p, t, valid_T, m["balance_double_softmax"])
                                for _, _, _, _, p, t in recs]).mean()
        return balance_term(torch.cat([r[4] for r in recs]), torch.cat([r[5] for r in recs]),
                            valid_T.repeat(len(recs)), m["balance_double_softmax"])

    per_router = [[r for r in records if r[0] == c and r[2] == pool]
                  for c in range(m["n_chunks"]) for pool in ("attn", "ffn")]
    zs = []
    for recs in per_router:
        z2 = torch.cat([torch.logsumexp(r[3], dim=-1) ** 2 for r in recs])
        w = valid_T.repeat(len(recs)).to(z2.dtype)
        zs.append((z2 * w).sum() / w.sum().clamp(min=1.0))
    if m["balance_reduction"] == "release":
        balance = sum(bal([r for r in records if r[2] == pool]) for pool in ("attn", "ffn"))
    else:
        balance = torch.stack([bal(recs) for recs in per_router]).mean()
    return balance, torch.stack(zs).mean()


@dataclass
class MoMModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor = None
    cache: Cache | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


@dataclass
class MoMCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None  # lm_loss + balance_coef * balance_loss + z_loss_coef * z_loss
    logits: torch.Tensor = None
    cache: Cache | None = None
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


@dataclass
class MoMSequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor = None
    cache: Cache | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class MoMPreTrainedModel(PreTrainedModel):
    config_class = MoMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block", "Chunk"]

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2 initialisation (weights normally come from the checkpoint; a fresh head, e.g. a
        classifier's ``score``, gets N(0, init_std))."""
        std = self.config.mom["init_std"]
        if isinstance(module, (nn.Linear, Linear)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, Pool):
            module.ln_weight.fill_(1.0)
            for name, p in module.named_parameters(recurse=False):
                if name.endswith("_weight") and name != "ln_weight":
                    p.normal_(0.0, std)
                elif name.endswith("_bias"):
                    p.zero_()
        elif isinstance(module, nn.GRUCell):
            for name, p in module.named_parameters():
                p.normal_(0.0, std) if "weight" in name else p.zero_()
        elif isinstance(module, Router) and module.head_bias is not None:
            module.head_bias.zero_()


class MoMModel(MoMPreTrainedModel):
    """The MoM body: final hidden states (after ``ln_f``) and the router losses."""

    def __init__(self, config):
        super().__init__(config)
        m = config.mom
        D, eps = m["d_model"], m["layer_norm_eps"]
        self.m = m
        self.wte = nn.Embedding(m["vocab_size"], D)
        self.wpe = nn.Embedding(m["max_seq_len"], D)
        self.bottom = nn.ModuleList([Block(D, eps) for _ in range(m["n_bottom"])])
        self.chunks = nn.ModuleList([Chunk(m, c) for c in range(m["n_chunks"])])
        self.anchors = nn.ModuleList([Block(D, eps) for _ in range(m["n_chunks"] if m["anchor"] else 0)])
        self.top = nn.ModuleList([Block(D, eps) for _ in range(m["n_top"])])
        self.ln_f = nn.LayerNorm(D, eps=eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                inputs_embeds=None, router_losses_wanted=False, past_key_values=None, **kwargs):
        m = self.m
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, S = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        key_pad_BL = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] != past + S:
                raise ValueError(f"attention_mask must be 2D (batch, cached + new tokens = {past + S}); got "
                                 f"{tuple(attention_mask.shape)}")
            key_pad_BL = attention_mask.bool()
            if bool(key_pad_BL.all()):
                key_pad_BL = None  # no padding: skip the mask (same numbers)
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
            else:
                position_ids = torch.arange(past, past + S, device=x.device).expand(B, S)
        position_ids = position_ids.to(x.device).expand(B, S)
        if int(position_ids.max()) >= m["max_seq_len"]:
            raise ValueError(f"position {int(position_ids.max())} is beyond max_position_embeddings="
                             f"{m['max_seq_len']}; shorten the input")
        p = m["dropout"] if self.training else 0.0
        ctx = AttentionContext(m["n_heads"], cache, key_pad_BL, p)
        x = ctx.dropout(x + self.wpe(position_ids))
        layer, records = 0, []
        for block in self.bottom:
            x = block(x, ctx, layer)
            layer += 1
        for c, chunk in enumerate(self.chunks):
            x, recs = chunk(x, ctx, layer)
            records += recs
            layer += m["n_steps"]
            if m["anchor"]:
                x = self.anchors[c](x, ctx, layer)
                layer += 1
        for block in self.top:
            x = block(x, ctx, layer)
            layer += 1
        out = MoMModelOutput(last_hidden_state=self.ln_f(x), cache=cache)
        if router_losses_wanted:
            valid_T = (attention_mask[:, -S:].bool() if attention_mask is not None
                       else torch.ones(B, S, dtype=torch.bool, device=x.device)).reshape(-1)
            out.balance_loss, out.z_loss = router_losses(m, records, valid_T)
        return out


def _with_router_losses(m, loss, out):
    if m["balance_coef"] > 0:
        loss = loss + m["balance_coef"] * out.balance_loss
    if m["z_loss_coef"] > 0:
        loss = loss + m["z_loss_coef"] * out.z_loss
    return loss


class MoMForCausalLM(MoMPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = MoMModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None,
                use_cache=None, inputs_embeds=None, logits_to_keep=0, num_items_in_batch=None,
                past_key_values=None, return_dict=True, **kwargs):
        """``labels`` as in transformers: shifted here, -100 ignored; the loss adds the router
        losses with the config's coefficients (``lm_loss`` holds the LM part alone)."""
        out = self.model(input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
                         use_cache, inputs_embeds, router_losses_wanted=labels is not None)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = F.linear(h, self.model.wte.weight)
        res = MoMCausalLMOutput(logits=logits, cache=out.cache)
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            if num_items_in_batch is not None:  # Trainer's gradient accumulation: sum / tokens of all micro-batches
                lm = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                lm = lm / torch.as_tensor(num_items_in_batch, device=lm.device, dtype=lm.dtype)
            else:
                lm = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            res.lm_loss, res.balance_loss, res.z_loss = lm, out.balance_loss, out.z_loss
            res.loss = _with_router_losses(self.config.mom, lm, out)
        return res


class MoMForSequenceClassification(MoMPreTrainedModel):
    """The MoM body + a linear ``score`` head on the last real (non-padding) token."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MoMModel(config)
        self.score = nn.Linear(config.mom["d_model"], self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                return_dict=True, **kwargs):
        out = self.model(input_ids, attention_mask, position_ids, None, False, inputs_embeds,
                         router_losses_wanted=labels is not None)
        h = out.last_hidden_state
        B, S = h.shape[:2]
        if attention_mask is not None:  # last position whose mask is 1 (left or right padding)
            last = (attention_mask.long() * torch.arange(S, device=h.device)).argmax(-1)
        elif input_ids is not None and self.config.pad_token_id is not None:
            last = ((input_ids != self.config.pad_token_id).long() * torch.arange(S, device=h.device)).argmax(-1)
        else:
            last = torch.full((B,), S - 1, device=h.device)
        logits = self.score(h[torch.arange(B, device=h.device), last])
        res = MoMSequenceClassifierOutput(logits=logits)
        if labels is not None:
            labels = labels.to(logits.device)
            kind = self.config.problem_type
            if kind is None:
                kind = ("regression" if self.num_labels == 1 else
                        "single_label_classification" if labels.dtype in (torch.long, torch.int) else
                        "multi_label_classification")
                self.config.problem_type = kind
            if kind == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float())
            elif kind == "single_label_classification":
                loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            res.balance_loss, res.z_loss = out.balance_loss, out.z_loss
            res.loss = _with_router_losses(self.config.mom, loss, out)
        return res

