"""The MoM model: config, layers, routers, dispatch, pools, losses, generation."""

from mom_dist.model.config import ModelConfig, RouterConfig, gpt2_config
from mom_dist.model.mom import MoMModel, MoMOutput, RoutingRecord

__all__ = ["ModelConfig", "RouterConfig", "gpt2_config", "MoMModel", "MoMOutput", "RoutingRecord"]
