"""Training loops: flow-matching / MSE image objectives, text CE, multitask batches, DDP / FSDP2.

Entry points: blip3o_fast.training.trainer.train(load_config(path, overrides)) and `blip3o-fast train`.
"""
