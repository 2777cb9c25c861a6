"""The task as the stages see it: its environment and reward rubric (environment.py) and its data (data.py)."""
