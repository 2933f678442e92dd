"""gnn3d modeling package."""
