"""The bottom layer, below the run layer and the algorithm; it imports nothing else from rlhf.

manifest.py  a directory that vouches for itself (every file's size and sha256, fsync, atomic publish)
fields.py    `one_of`: a config field with a closed set of values, for every part's config dataclass
"""
