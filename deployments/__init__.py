"""Cloud side: the large model behind Ray Serve. Deployments are thin shims over engines."""
