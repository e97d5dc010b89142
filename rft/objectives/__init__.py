"""Reward-finetuning objectives: one file per method, each registering its record.

Diffusion: prdp.py (PRDP), ddpo.py (DDPO), draft.py (DRaFT-K, DRaFT-LV, AlignProp),
raft.py (RAFT), flow_grpo.py (Flow-GRPO / DanceGRPO) and nft.py (DiffusionNFT), on flow
bases; reno.py (ReNO, inference-time, its own trainer). LM: grpo.py (the GRPO family and
RAFT); rebel.py (REBEL) and copg.py (CoPG), pair objectives on lm_pairs.py. The
registries and the record types are in registry.py; the engines they plug into are
trajectory.py (log-prob gradients through stored trajectories) and step_baselines.py
(per-step baselines of trajectory objectives).
"""
from rft.objectives import registry  # noqa: F401  (first: the modules below register here)
from rft.objectives import ddpo, draft, flow_grpo, grpo, nft, prdp, raft  # noqa: F401  (built-ins)
from rft.objectives import copg, rebel  # noqa: F401  (LM pair objectives)
