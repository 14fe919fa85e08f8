"""Test harness only (see fault_hook.py): in a process started with this folder on PYTHONPATH and a fault
requested, install the hook before any training code runs."""

import os

if os.environ.get("TRAINFLOW_INJECT_FAULT"):
    try:
        import fault_hook

        fault_hook.install()
    except ImportError:  # the project is not importable in this process: nothing to inject into
        pass
