"""Configuration of a MoM model (spec §2-§6) and its routers.

A vanilla GPT-2, an MoE and a layer-skip network are all configurations of the same model
(spec §7); see ``configs/`` for presets. ``validate()`` rejects impossible combinations with
a ``ValueError`` that names the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mom_dist.config_utils import check, check_choice

ROUTER_KINDS = ("gru", "mlp")
SCHEDULES = ("free", "diagonal")
# renorm: top-K probabilities renormalised to sum to 1 (the authors' reference). With K=1 the
#   weight is exactly 1, so the LM loss sends no gradient to the router.
# straight_through: forward value of renorm, gradient of the raw top-K probabilities (default:
#   identical numbers to the reference, but routers learn from the LM loss too).
# raw: the raw top-K probabilities are the weights (forward and backward).
WEIGHTINGS = ("straight_through", "renorm", "raw")
BALANCE_MODES = ("pooled", "depthwise")
# mean: each router's balance loss (chunk x {attn, ffn}, over its own steps) averaged over routers.
# release: the authors' reduction - attention loss + FFN loss (a sum), each over the steps of all
#   chunks together (pooled) or averaged over all chunks' steps (depthwise); so balance_coef means
#   what the release's router_aux_loss_coef means.
BALANCE_REDUCTIONS = ("mean", "release")


@dataclass
class RouterConfig:
    kind: str = "gru"  # gru (stateful over a chunk's H steps) | mlp (stateless)
    dim: int = 256  # recurrent state / hidden size r
    temperature: float = 0.2  # tau in softmax(W_o h / tau)
    top_k: int = 1
    allow_skip: bool = True  # False masks every SKIP class out of the choice
    schedule: str = "free"  # free | diagonal (step h may pick only module h mod N, plus SKIP)
    weighting: str = "straight_through"

    def validate(self, where: str = "router") -> None:
        check_choice(self.kind, ROUTER_KINDS, f"{where}.kind")
        check_choice(self.schedule, SCHEDULES, f"{where}.schedule")
        check_choice(self.weighting, WEIGHTINGS, f"{where}.weighting")
        check(self.dim >= 1, f"{where}.dim={self.dim} must be >= 1")
        check(self.temperature > 0, f"{where}.temperature={self.temperature} must be > 0")
        check(self.top_k >= 1, f"{where}.top_k={self.top_k} must be >= 1")


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    max_seq_len: int = 1024  # number of learned positions
    d_model: int = 768
    n_heads: int = 12
    n_bottom: int = 2  # B ordinary GPT-2 blocks before the chunks
    n_top: int = 1  # T ordinary GPT-2 blocks after the chunks
    n_chunks: int = 1  # C MoM blocks
    n_attn_modules: int = 4  # N_A per chunk
    n_ffn_modules: int = 4  # N_F per chunk
    n_steps: int = 8  # H routing steps per chunk
    anchor: bool = False  # an ordinary GPT-2 block after each chunk
    attn_router: RouterConfig = field(default_factory=RouterConfig)
    ffn_router: RouterConfig = field(default_factory=RouterConfig)
    qkv_weighted: bool = False  # spec §5.2: reference mixes QKV unweighted
    mask_skip_keys: bool = False  # True: later tokens ignore the zero key of an all-SKIP token
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    balance_coef: float = 0.01
    balance_mode: str = "pooled"  # pooled over all steps (reference) | depthwise (per step)
    balance_double_softmax: bool = False  # reproduce the reference's second softmax (weaker loss)
    balance_reduction: str = "mean"  # mean over routers | release (attn + FFN sum, pooled across chunks)
    router_bias: bool = False  # GRU routers' output layer gets a bias (head_bias), as in the release
    z_loss_coef: float = 0.0
    activation_checkpointing: bool = False  # recompute blocks, module compute and attention in backward
    grouped_gemm: str = "auto"  # auto | on | off: torch._grouped_mm for module pools

    @property
    def n_classes(self) -> int:
        """Router classes: max(N_A, N_F) modules + SKIP (an attention router's extra classes are SKIP)."""
        return max(self.n_attn_modules, self.n_ffn_modules) + 1

    @property
    def depth(self) -> int:
        return self.n_bottom + self.n_chunks * (self.n_steps + int(self.anchor)) + self.n_top

    @property
    def source_layers(self) -> int:
        """Layers of the vanilla GPT-2 a phase-2 MoM is decomposed from (spec §8)."""
        return self.n_bottom + self.n_chunks * (max(self.n_attn_modules, self.n_ffn_modules) + int(self.anchor)) + self.n_top

    def validate(self) -> None:
        for name in ("vocab_size", "max_seq_len", "d_model", "n_heads", "n_chunks", "n_steps"):
            check(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        for name in ("n_bottom", "n_top"):
            check(getattr(self, name) >= 0, f"model.{name}={getattr(self, name)} must be >= 0")
        check(self.n_attn_modules >= 1,
              f"model.n_attn_modules={self.n_attn_modules}: a pool needs at least 1 module; "
              "to skip attention entirely use attn_router.allow_skip with a SKIP-heavy router")
        check(self.n_ffn_modules >= 1, f"model.n_ffn_modules={self.n_ffn_modules}: a pool needs at least 1 module")
        check(self.d_model % self.n_heads == 0,
              f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}; "
              f"pick n_heads in {[h for h in range(1, 65) if self.d_model % h == 0]}")
        check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        check_choice(self.balance_mode, BALANCE_MODES, "model.balance_mode")
        check_choice(self.balance_reduction, BALANCE_REDUCTIONS, "model.balance_reduction")
        check_choice(self.grouped_gemm, ("auto", "on", "off"), "model.grouped_gemm")
        check(self.balance_coef >= 0 and self.z_loss_coef >= 0, "model.balance_coef and model.z_loss_coef must be >= 0")
        for name, router, pool in (("attn_router", self.attn_router, self.n_attn_modules),
                                   ("ffn_router", self.ffn_router, self.n_ffn_modules)):
            where = f"model.{name}"
            router.validate(where)
            skip_classes = self.n_classes - pool if router.allow_skip else 0
            if router.schedule == "diagonal":
                choices = 1 + skip_classes
                check(router.top_k <= choices,
                      f"{where}.top_k={router.top_k} exceeds the {choices} choice(s) a diagonal schedule "
                      f"leaves per step; set {where}.top_k=1")
            else:
                check(router.top_k <= pool + skip_classes,
                      f"{where}.top_k={router.top_k} exceeds the {pool + skip_classes} classes it can pick "
                      f"({pool} modules{' + SKIP' if skip_classes else ''}, i.e. K <= N+1); lower top_k")


def gpt2_config(d_model: int, n_heads: int, n_layers: int, **overrides) -> ModelConfig:
    """The vanilla special case (spec §7): N_A = N_F = H = L, K=1, diagonal schedule, no SKIP."""
    router = dict(kind="mlp", dim=8, top_k=1, allow_skip=False, schedule="diagonal", weighting="renorm")
    kwargs = dict(d_model=d_model, n_heads=n_heads, n_bottom=0, n_top=0, n_chunks=1,
                  n_attn_modules=n_layers, n_ffn_modules=n_layers, n_steps=n_layers,
                  attn_router=RouterConfig(**router), ffn_router=RouterConfig(**router), balance_coef=0.0)
    kwargs.update(overrides)
    cfg = ModelConfig(**kwargs)
    cfg.validate()
    return cfg
