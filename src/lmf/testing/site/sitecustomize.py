"""With this folder on ``PYTHONPATH`` (tests/conftest.py puts it there), every Python process of a test run, torchrun's
workers included, installs lmf's test fault injection (:mod:`lmf.testing.faults`) when one of its variables is set
(that module imports only the standard library until :func:`~lmf.testing.faults.install` runs)."""

import os

from lmf.testing.faults import VARIABLES, install

if any(os.environ.get(name) for name in VARIABLES):
    install()
