"""transformers config of a Mixture-of-Modules model exported by mom_dist (``mom-convert to-hf``).

``mom`` holds the fields of ``mom_dist.model.config.ModelConfig``.
"""

from transformers import PretrainedConfig


class MoMConfig(PretrainedConfig):
    model_type = "mom"

    def __init__(self, mom=None, **kwargs):
        self.mom = mom or {}
        kwargs.setdefault("tie_word_embeddings", False)  # tied inside MoMModel itself
        super().__init__(**kwargs)
