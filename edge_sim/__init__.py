"""Device side: simulated edge clients that hold private context, run the small model and fuse."""
