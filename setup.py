"""mom_dist: distributed training of Mixture-of-Modules language models on DeepSpeed.

Install torch first (CPU: `pip install torch==2.13.0`; GPU clusters: your CUDA build), then
`pip install -e .` (see README.md).
"""

from setuptools import find_packages, setup

setup(
    name="mom_dist",
    version="0.1.0",
    description="Distributed training of Mixture-of-Modules language models (expert-parallel, DeepSpeed)",
    packages=find_packages(include=["mom_dist", "mom_dist.*"]),
    python_requires=">=3.10",
    # torch is deliberately not pinned here: a loose torch requirement pulls a CUDA build onto
    # CPU machines; install it first (requirements-cpu.txt pins the tested CPU stack).
    install_requires=["deepspeed>=0.19", "megatron-core>=0.16", "datasets", "sentencepiece", "numpy", "pyyaml",
                      "tqdm", "zstandard", "safetensors",
                      "matplotlib", "xxhash"],
    extras_require={"mpi": ["mpi4py"], "tensorboard": ["tensorboard"], "test": ["pytest", "transformers"],
                    "finetune": ["rouge-score==0.1.2"],
                    # lm-evaluation-harness on `mom-convert to-hf` directories (tested with these)
                    "eval": ["lm-eval[hf]==0.4.13", "transformers"]},
    entry_points={"console_scripts": [
        "mom-train = mom_dist.cli.train:main",
        "mom-preprocess = mom_dist.cli.preprocess:main",
        "mom-convert = mom_dist.cli.convert:main",
        "mom-eval = mom_dist.cli.evaluate:main",
        "mom-finetune = mom_dist.cli.finetune:main",
        "mom-report = mom_dist.cli.report:main",
        "mom-plan = mom_dist.cli.plan:main",
        "mom-prune = mom_dist.cli.prune:main",
    ]},
)
