"""``python -m lmf`` == ``lmf``."""

from lmf.launcher import launch

if __name__ == "__main__":
    launch()
