"""What the loops finetune and how it is judged: diffusion_worlds.py (the diffusion worlds,
ShapesWorld and Stable Diffusion, by config.world), shapes_eval.py (the ShapesWorld judge:
evaluator alignment of generated images; `python -m rft.worlds.shapes_eval` measures the
base model), arith_eval.py (the arithmetic world's exact-match evaluation)."""
