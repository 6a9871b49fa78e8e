"""The control plane: conntrack-driven offload decisions, path resolution, keep-alive and teardown."""
