"""svd_orthogonal: adaptive-SVD orthogonal full fine-tuning, and its machinery.

strategy.py  the strategy (hooks, config, report)
rank.py      k per target matrix (adaptive importance, ratio, schedule)
targets.py   which weight matrices are constrained, per model family
groups.py    ProjectionGroups: bases, gradient views, anchors and checkpoint padding of the
             unsharded path (the projection math itself is in cl_runner.ops)
sharded.py   ShardedSubspaces: the same for FSDP2-sharded weights
"""
from cl_runner.strategies.svd_orthogonal.groups import ProjectionGroups
from cl_runner.strategies.svd_orthogonal.strategy import SVDOrthogonal, SVDOrthogonalConfig, SVDRankConfig

__all__ = ["ProjectionGroups", "SVDOrthogonal", "SVDOrthogonalConfig", "SVDRankConfig"]
