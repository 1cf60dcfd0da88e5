"""LatentWire: compress a prompt into M soft tokens that frozen LLMs read as an ``inputs_embeds`` prefix.

The workload the main job (``telepathy.preemptible_training``) trains: a byte-level encoder with a latent
pooler, one adapter per LLM, frozen causal LMs. Only the encoder and adapters train and are checkpointed.
"""
