"""Test harness that runs real SyftBox sync (a local server and one client per party)."""
