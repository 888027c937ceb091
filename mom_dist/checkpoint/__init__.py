"""Checkpoints, one home: every file of ours that holds weights or training state.

- ``layout``: the names (``checkpoints/latest``, ``stepNNNNNNNN/``, ``mom_state.json``, rank
  files) and the small files that tie a checkpoint together;
- ``shards``: the layout-free format, each rank's pieces of the global tensors in one
  safetensors file, read back as any range; ``safe_load``: ``.pt`` files read as plain data
  only, the RNG files;
- ``engine_state`` / ``engine_io``: a DeepSpeed engine's state to and from those pieces, so a
  checkpoint resumes on any layout;
- ``consolidate``: a checkpoint as one plain state dict; ``exported``: the exported model
  directory; ``sources``: a model from any source (run, export, transformers directory);
- ``run_lock``: one run per ``out_dir``.

The trainer's policy on top (when to save, ``keep_last``, rollback) is ``mom_dist.train.checkpoint``;
translations to other formats are ``mom_dist.convert``. Nothing is imported here: readers of an
exported model need neither DeepSpeed nor the engine code.
"""
