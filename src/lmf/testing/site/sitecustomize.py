"""With this folder on ``PYTHONPATH`` (tests/conftest.py puts it there), every Python process of a test run, torchrun's
workers included, installs lmf's test fault injection (:mod:`lmf.testing.faults`) when one of its variables is set.
Inert otherwise: nothing is imported."""

import os

if any(os.environ.get(name) for name in ("LMF_TEST_KILL_AT_STEP", "LMF_TEST_KILL_DURING_SAVE", "LMF_TEST_SIGNAL_AT_STEP",
                                         "LMF_TEST_STEP_SLEEP_S", "LMF_FINGERPRINT_OVERRIDE")):
    from lmf.testing.faults import install

    install()
