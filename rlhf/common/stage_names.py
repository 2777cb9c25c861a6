"""The stage names in pipeline order, below everything that orders stages (the schema, the run layer, the report)."""

STAGES = ("sft", "reward", "ppo", "evaluate")
"""Stage names in pipeline order; what each one is lives in the registry, `rlhf.stages.REGISTRY`."""
