"""The bottom layer, below the run layer and the algorithm: durable files on disk.

manifest.py  a directory that vouches for itself (every file's size and sha256, fsync, atomic publish)
"""
