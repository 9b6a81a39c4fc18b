"""The synthetic shapes world and its benchmarks: world (scenes, captions, rendering, questions), writer
(WebDataset shards + JSON through blip3o_fast.data), analyser (image -> objects), geneval (Mini-GenEval),
understanding (held-out answer accuracy), evaluate (`blip3o-fast eval shapes`)."""
