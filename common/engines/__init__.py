"""Engine helpers: handlers, schedulers and runtime settings shared by the bundles."""
