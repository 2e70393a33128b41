"""Launching on a cluster: job specs (jobs/*.yaml), submission through Ray's job API, memory planning."""
