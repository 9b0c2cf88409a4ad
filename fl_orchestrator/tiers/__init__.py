"""Tiers of daemons over SyftBox: a region is a daemon that is one datasite of a root job."""
