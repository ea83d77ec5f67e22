"""Parts of Luo et al.'s generator ensemble that its stages share (stages/ensemble.py)."""
