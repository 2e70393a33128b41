"""Ray Tune sweeps in which every trial is a training run: the search space, the sweep, the results."""
