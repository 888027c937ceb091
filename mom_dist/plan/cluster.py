"""A cluster description for ``mom-plan``, loaded from YAML and validated like every config.

    nodes: 2                  # machines
    gpus_per_node: 8
    gpu_memory_gb: 80         # per GPU, GiB (2**30 bytes) as nvidia-smi shows it
    peak_bf16_tflops: 989     # dense bf16 tensor-core peak per GPU (no sparsity)
    intra_node_gbps: 3600     # GPU <-> GPU inside a node, per GPU and direction, Gbit/s (NVLink)
    inter_node_gbps: 400      # per GPU and direction across nodes, Gbit/s (its NIC)
    name: H100 x 16           # optional label for tables

Unknown keys and impossible values raise ``ValueError`` naming the field and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from mom_dist.config_utils import check, from_dict, load_yaml


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    peak_bf16_tflops: float = 989.0
    intra_node_gbps: float = 3600.0
    inter_node_gbps: float = 400.0
    name: str = ""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> float:
        return self.gpu_memory_gb * 2 ** 30

    def label(self) -> str:
        return self.name or f"{self.nodes} x {self.gpus_per_node} GPUs"

    def validate(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  f"cluster.{name}={value!r} must be a whole number >= 1")
        for name in ("gpu_memory_gb", "peak_bf16_tflops", "intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                  f"cluster.{name}={value!r} must be a number > 0")
            setattr(self, name, float(value))
        check(isinstance(self.name, str), f"cluster.name={self.name!r} must be a string")


def load_cluster(path: str) -> ClusterConfig:
    if not os.path.isfile(path):
        raise ValueError(f"cluster file '{path}' does not exist; pass one like configs/clusters/h100-2x8.yaml")
    try:
        data = load_yaml(path)
    except yaml.YAMLError as err:
        raise ValueError(f"cluster file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        cluster = from_dict(ClusterConfig, data, where="cluster.")
        cluster.validate()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return cluster
