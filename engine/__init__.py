"""gnn3d engine package."""
