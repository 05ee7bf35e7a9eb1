"""On PYTHONPATH, this dir injects the fault named by RLHF_FAULT (see tests/faults/faulty_cli.py) into every
rank a launcher starts (LOCAL_RANK set), for tests that launch through stages/*.sh, where the ranks run
`python -m rlhf.cli` and a test cannot swap in faulty_cli.py. Other processes are left alone."""

import os
import sys

if os.environ.get("RLHF_FAULT") and "LOCAL_RANK" in os.environ:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import faulty_cli

    faulty_cli.install(os.environ["RLHF_FAULT"])
