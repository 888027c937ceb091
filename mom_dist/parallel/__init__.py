"""Parallelism applied to the plain MoM model from outside: process groups, all-to-all
dispatch, expert-parallel sharding and the DeepSpeed engine."""
