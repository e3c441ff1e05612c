"""``scenes``: procedural dSprites-like RGB scenes, a small ViT backbone and its pretrained base.

Standalone for now (generator, backbone, pretraining, measurement); the workload class that plugs it
into the core comes with the model protocol. docs/workloads.md ("Scenes workload") has the figures.
"""
