"""The bottom layer, below the run layer and the algorithm; it imports nothing else from rlhf.

manifest.py     a directory that vouches for itself (every file's size and sha256, fsync, atomic publish)
fields.py       `one_of` and the range rules every part's config dataclass is checked with
stage_names.py  STAGES: the stage names in pipeline order
"""
