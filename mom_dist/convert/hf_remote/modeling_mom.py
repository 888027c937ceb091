"""transformers wrapper of ``mom_dist.model.MoMModel`` for evaluation and fine-tuning scripts
(GLUE, XSUM) that load models with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``. Needs ``mom_dist`` installed. Greedy decoding with per-routing-step
KV caches: ``mom_dist.model.generate.generate_greedy(model.mom, ...)``.
"""

import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_mom import MoMConfig


class MoMForCausalLM(PreTrainedModel):
    config_class = MoMConfig
    base_model_prefix = "mom"

    def __init__(self, config):
        super().__init__(config)
        from mom_dist.config_utils import from_dict
        from mom_dist.model import MoMModel
        from mom_dist.model.config import ModelConfig

        mcfg = from_dict(ModelConfig, config.mom, "model.")
        mcfg.validate()
        self.mom = MoMModel(mcfg)
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the checkpoint; MoMModel initialises itself otherwise."""

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """Causal LM logits; ``labels`` as in transformers (shifted here, -100 ignored);
        ``attention_mask`` (1 = token, 0 = padding) hides padded keys."""
        mask = None
        if attention_mask is not None:
            S = input_ids.shape[1]
            mask = (attention_mask[:, None, :] == 0).expand(-1, S, -1)
        logits = self.mom(input_ids, attention_mask_BSL=mask).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
