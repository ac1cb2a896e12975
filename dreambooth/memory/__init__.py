"""GPU memory of a training configuration: a tracker of live tensor bytes and the estimate from a dry run."""
